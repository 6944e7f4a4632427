//! `lexp check --cpu` for the fine-tuning kernels (bias epilogues, embedding, causal softmax
//! and its backward, cross-entropy, AdamW, dropout): each run in the interpreter at one small shape
//! that crosses tile edges, against its CPU reference.

use super::{poisoned, t, Outputs};
use crate::kernel_check::Rng;
use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference as refr;
use lexp_kernels::SUM_SQUARES_CHUNK;

/// `n` integers uniform in `lo..hi`.
fn ints(rng: &mut Rng, n: usize, lo: i32, hi: i32) -> Vec<i32> {
    rng.uniform(n, lo as f32, hi as f32)
        .iter()
        .map(|x| (x.floor() as i32).clamp(lo, hi - 1))
        .collect()
}

/// An i32 tensor holding `v`.
fn int_tensor(v: &[i32]) -> HostTensor {
    let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, &[v.len()], &f)
}

/// The interpreter shape of one of this module's kernels (`None` for other kernels).
pub(super) fn dims(kernel: &str) -> Option<(usize, usize)> {
    Some(match kernel {
        "bias_add" | "bias_relu" | "dropout_mask" | "mul_inplace" => (33, 300),
        "embedding_fwd" => (37, 1100),
        // (heads, length).
        "causal_softmax" => (2, 300),
        "softmax_bwd" => (9, 1100),
        "xent_fwd_bwd" => (9, 3000),
        "adamw" => (5000, 0),
        // Two full chunks and a partial one.
        "sum_squares" => (2 * SUM_SQUARES_CHUNK + 777, 0),
        _ => return None,
    })
}

/// How a shape of this module's kernels prints (`None` for other kernels and plain shapes).
pub(super) fn shape_text(kernel: &str, dims: (usize, usize)) -> Option<String> {
    match kernel {
        "causal_softmax" => Some(format!("[{}x{}, {}]", dims.0, dims.1, dims.1)),
        _ => None,
    }
}

/// Runs one of this module's kernels in the interpreter; returns its outputs and references.
pub(super) fn run(
    kernel: &str,
    dtype: Storage,
    (r, c): (usize, usize),
    rng: &mut Rng,
) -> Result<Outputs, LaunchError> {
    Ok(match kernel {
        "bias_add" | "bias_relu" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut bias = t(rng, dtype, &[c], -1.0, 1.0);
            let want = if kernel == "bias_relu" {
                refr::bias_relu(&x.data, r, c, &bias.data)
            } else {
                refr::bias_add(&x.data, r, c, &bias.data)
            };
            if kernel == "bias_relu" {
                let args = k::bias_relu::HostArgs {
                    x: &mut x,
                    bias: &mut bias,
                };
                k::bias_relu::interpret(&[], args)?;
            } else {
                let args = k::bias_add::HostArgs {
                    x: &mut x,
                    bias: &mut bias,
                };
                k::bias_add::interpret(&[], args)?;
            }
            vec![("x", x, want, 0.0)]
        }
        "dropout_mask" => {
            let p = 0.1;
            let mut u = t(rng, Storage::F32, &[r, c], 0.0, 1.0);
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let (_, wm) = refr::dropout_mask(&x.data, &u.data, p);
            // `x` is scaled by the mask as stored (rounded to the storage type).
            let wx = refr::mul_inplace(&x.data, &HostTensor::new(dtype, &[r, c], &wm).data);
            let mut mask = poisoned(dtype, &[r, c]);
            let args = k::dropout_mask::HostArgs {
                x: &mut x,
                u: &mut u,
                mask: &mut mask,
                p,
            };
            k::dropout_mask::interpret(&[], args)?;
            vec![("x", x, wx, 0.0), ("mask", mask, wm, 0.0)]
        }
        "mul_inplace" => {
            let mut m = t(rng, dtype, &[r, c], 0.0, 2.0);
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let want = refr::mul_inplace(&x.data, &m.data);
            let args = k::mul_inplace::HostArgs {
                x: &mut x,
                m: &mut m,
            };
            k::mul_inplace::interpret(&[], args)?;
            vec![("x", x, want, 0.0)]
        }
        "embedding_fwd" => {
            let (vocab, positions) = (50usize, 30usize);
            let mut tok = t(rng, dtype, &[vocab, c], -3.0, 3.0);
            let mut pos = t(rng, dtype, &[positions + 2, c], -1.0, 1.0);
            let id = ints(rng, r, 0, vocab as i32);
            let pid = ints(rng, r, -1, positions as i32);
            let want = refr::embedding_fwd(&tok.data, &pos.data, c, &id, &pid);
            let (mut ids, mut pos_ids) = (int_tensor(&id), int_tensor(&pid));
            let mut y = poisoned(dtype, &[r, c]);
            let args = k::embedding_fwd::HostArgs {
                tok: &mut tok,
                pos: &mut pos,
                ids: &mut ids,
                pos_ids: &mut pos_ids,
                y: &mut y,
            };
            k::embedding_fwd::interpret(&[], args)?;
            vec![("y", y, want, 0.0)]
        }
        "causal_softmax" => {
            let (heads, len) = (r, c);
            let rows = heads * len;
            let s = t(rng, Storage::F32, &[rows, len], -8.0, 8.0);
            let (wp, wl) = refr::causal_softmax(&s.data, rows, len);
            let mut out = vec![];
            // Both tile configurations: the default runs these rows in one block, the small
            // one loops over 128-wide chunks.
            for (consts, names) in [
                (&[][..], ["p", "lse"]),
                (&[("BLOCK", 256), ("CHUNK", 128)][..], ["p@256", "lse@256"]),
            ] {
                let mut s = s.clone();
                let mut p = poisoned(dtype, &[rows, len]);
                let mut lse = poisoned(Storage::F32, &[rows]);
                let args = k::causal_softmax::HostArgs {
                    s: &mut s,
                    p: &mut p,
                    lse: &mut lse,
                };
                k::causal_softmax::interpret(consts, args)?;
                out.push((names[0], p, wp.clone(), 0.0));
                out.push((names[1], lse, wl.clone(), 0.0));
            }
            out
        }
        "softmax_bwd" => {
            let scores = rng.uniform(r * c, -4.0, 4.0);
            let p = HostTensor::new(dtype, &[r, c], &refr::softmax(&scores, r, c));
            let dp = t(rng, Storage::F32, &[r, c], -3.0, 3.0);
            let want = refr::softmax_bwd(&p.data, &dp.data, r, c);
            let mut out = vec![];
            // The default configuration runs these rows in one block, the small one loops.
            for (consts, name) in [
                (&[][..], "ds"),
                (&[("BLOCK", 256), ("CHUNK", 128)][..], "ds@256"),
            ] {
                let (mut p, mut dp) = (p.clone(), dp.clone());
                let mut ds = poisoned(dtype, &[r, c]);
                let args = k::softmax_bwd::HostArgs {
                    p: &mut p,
                    dp: &mut dp,
                    ds: &mut ds,
                };
                k::softmax_bwd::interpret(consts, args)?;
                out.push((name, ds, want.clone(), 0.0));
            }
            out
        }
        "xent_fwd_bwd" => {
            let z0 = t(rng, Storage::F32, &[r, c], -8.0, 8.0);
            // Every third row ignored.
            let tg: Vec<i32> = ints(rng, r, 0, c as i32)
                .into_iter()
                .enumerate()
                .map(|(i, t)| if i % 3 == 1 { -100 } else { t })
                .collect();
            let scale = 0.25;
            let (wz, wl) = refr::xent_fwd_bwd(&z0.data, r, c, &tg, scale);
            let mut out = vec![];
            // Both tile configurations (2048- and 256-wide chunks).
            for (consts, names) in [
                (&[][..], ["dz", "loss"]),
                (&[("CHUNK", 256)][..], ["dz@256", "loss@256"]),
            ] {
                let mut z = z0.clone();
                let mut targets = int_tensor(&tg);
                let mut loss = poisoned(Storage::F32, &[r]);
                let mut dz = poisoned(dtype, &[r, c]);
                let args = k::xent_fwd_bwd::HostArgs {
                    z: &mut z,
                    targets: &mut targets,
                    loss: &mut loss,
                    scale,
                    dz: &mut dz,
                };
                k::xent_fwd_bwd::interpret(consts, args)?;
                out.push((names[0], dz, wz.clone(), 0.0));
                out.push((names[1], loss, wl.clone(), 0.0));
            }
            out
        }
        "adamw" => {
            let f32s = Storage::F32;
            let s = refr::AdamwStep {
                grad_scale: 0.7,
                ..refr::AdamwStep::at(1e-2, 0.9, 0.999, 1e-8, 1e-2, 10)
            };
            let mut grad = t(rng, dtype, &[r], -3.0, 3.0);
            let mut p = t(rng, f32s, &[r], -3.0, 3.0);
            let mut m = t(rng, f32s, &[r], -1.0, 1.0);
            let mut v = t(rng, f32s, &[r], 0.01, 2.0);
            let (wp, wm, wv) = refr::adamw(&p.data, &grad.data, &m.data, &v.data, &s);
            let args = k::adamw::HostArgs {
                param: &mut p,
                grad: &mut grad,
                grad_scale: s.grad_scale,
                m: &mut m,
                v: &mut v,
                lr: s.lr,
                beta1: s.beta1,
                beta2: s.beta2,
                eps: s.eps,
                weight_decay: s.weight_decay,
                bias_correction1: s.bias_correction1,
                bias_correction2_sqrt: s.bias_correction2_sqrt,
            };
            k::adamw::interpret(&[], args)?;
            vec![("param", p, wp, 0.0), ("m", m, wm, 0.0), ("v", v, wv, 0.0)]
        }
        "sum_squares" => {
            let mut x = t(rng, Storage::F32, &[r], -3.0, 3.0);
            let parts = r.div_ceil(SUM_SQUARES_CHUNK);
            let want = refr::sum_squares(&x.data, SUM_SQUARES_CHUNK);
            let mut out = HostTensor::new(Storage::F32, &[parts], &vec![f32::NAN; parts]);
            k::sum_squares::interpret(
                &[],
                k::sum_squares::HostArgs {
                    x: &mut x,
                    out: &mut out,
                },
            )?;
            vec![("out", out, want, 0.0)]
        }
        other => {
            return Err(LaunchError::NoVariant {
                kernel: "check",
                wanted: format!("unknown kernel `{other}`"),
            });
        }
    })
}
