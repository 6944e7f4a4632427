//! GPU checks of the fine-tuning kernels (bias epilogues, embedding, causal softmax and its
//! backward, cross-entropy, AdamW): inputs, outputs, launch closures, shapes.
//!
//! Kernels that update a tensor in place get that tensor as an output whose initial contents
//! are written back before each launch ([`Output::init`]), so that every configuration and
//! every timed launch sees the same input.

use super::{round, Ctx, Output, Prepared};
use crate::DeviceError;
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::TensorArg;
use lexp_kernels as k;
use lexp_kernels::reference as refr;
use lexp_kernels::SUM_SQUARES_CHUNK;

impl Ctx<'_> {
    /// A tensor the kernel reads and overwrites: random values in `[lo, hi)` (rounded to
    /// `dtype`, default the run's), uploaded; returns the values, the argument and the output
    /// (whose reference the caller sets).
    fn in_place(
        &mut self,
        name: &'static str,
        dims: &[usize],
        lo: f32,
        hi: f32,
        dtype: Option<Storage>,
    ) -> Result<(Vec<f32>, TensorArg, Output), DeviceError> {
        let dtype = dtype.unwrap_or(self.dtype);
        let n: usize = dims.iter().product();
        let host = round(dtype, &self.rng.uniform(n, lo, hi));
        let (t, arg) = self.place(dtype, dims, &host)?;
        let init = if self.misalign {
            std::iter::once(0.0).chain(host.iter().copied()).collect()
        } else {
            host.clone()
        };
        let out = Output {
            name,
            t,
            want: vec![],
            accumulate: false,
            scale: 0.0,
            init: Some(init),
        };
        Ok((host, arg, out))
    }

    /// An input holding `host` (already rounded to `dtype`); returns its argument.
    fn input_from(
        &mut self,
        dims: &[usize],
        dtype: Storage,
        host: &[f32],
    ) -> Result<TensorArg, DeviceError> {
        let (t, arg) = self.place(dtype, dims, host)?;
        self.inputs.push(t);
        Ok(arg)
    }

    /// An i32 input of `n` integers uniform in `lo..hi`; returns them and the argument.
    fn ints(&mut self, n: usize, lo: i32, hi: i32) -> Result<(Vec<i32>, TensorArg), DeviceError> {
        let v: Vec<i32> = self
            .rng
            .uniform(n, lo as f32, hi as f32)
            .iter()
            .map(|x| (x.floor() as i32).clamp(lo, hi - 1))
            .collect();
        let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
        let (t, arg) = self.place(Storage::I32, &[n], &f)?;
        self.inputs.push(t);
        Ok((v, arg))
    }
}

/// Dropout probability of the `dropout_mask` checks (OPT's).
const DROPOUT_P: f32 = 0.1;

/// Vocabulary and position-table rows of the embedding checks (OPT: 2048 positions + 2).
const EMB_VOCAB: usize = 517;
const EMB_POSITIONS: usize = 2048;

/// Prepares one of this module's kernels (`dims` as [`check_shapes`] gives them).
pub(super) fn prepare(
    cx: &mut Ctx<'_>,
    kernel: &str,
    dims: (usize, usize),
) -> Result<Prepared, DeviceError> {
    let e = cx.dtype.bytes();
    let (r, c) = dims;
    Ok(match kernel {
        "bias_add" | "bias_relu" => {
            let relu = kernel == "bias_relu";
            let (b, ba) = cx.input(&[c], -1.0, 1.0, None)?;
            let (x, xa, mut out) = cx.in_place("x", &[r, c], -3.0, 3.0, None)?;
            out.want = cx.want(|| {
                if relu {
                    refr::bias_relu(&x, r, c, &b)
                } else {
                    refr::bias_add(&x, r, c, &b)
                }
            });
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, consts| {
                    if relu {
                        k::bias_relu::launch_with(
                            l,
                            consts,
                            &k::bias_relu::Args { x: &xa, bias: &ba },
                        )
                    } else {
                        k::bias_add::launch_with(
                            l,
                            consts,
                            &k::bias_add::Args { x: &xa, bias: &ba },
                        )
                    }
                }),
                bytes: 2 * r * c * e,
            }
        }
        "dropout_mask" => {
            let p = DROPOUT_P;
            let (u, ua) = cx.input(&[r, c], 0.0, 1.0, Some(Storage::F32))?;
            let (x, xa, mut out) = cx.in_place("x", &[r, c], -3.0, 3.0, None)?;
            // `x` is scaled by the mask as stored (rounded to the storage type).
            let (wx, wm) = if cx.with_ref {
                let (_, wm) = refr::dropout_mask(&x, &u, p);
                (refr::mul_inplace(&x, &round(cx.dtype, &wm)), wm)
            } else {
                (vec![], vec![])
            };
            out.want = wx;
            let (mask, ma) = cx.output("mask", &[r, c], None, wm, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out, mask],
                launch: Box::new(move |l, consts| {
                    k::dropout_mask::launch_with(
                        l,
                        consts,
                        &k::dropout_mask::Args {
                            x: &xa,
                            u: &ua,
                            mask: &ma,
                            p,
                        },
                    )
                }),
                bytes: 3 * r * c * e + 4 * r * c,
            }
        }
        "mul_inplace" => {
            let (m, ma) = cx.input(&[r, c], 0.0, 2.0, None)?;
            let (x, xa, mut out) = cx.in_place("x", &[r, c], -3.0, 3.0, None)?;
            out.want = cx.want(|| refr::mul_inplace(&x, &m));
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, consts| {
                    k::mul_inplace::launch_with(l, consts, &k::mul_inplace::Args { x: &xa, m: &ma })
                }),
                bytes: 3 * r * c * e,
            }
        }
        "embedding_fwd" => {
            let (tok, ta) = cx.input(&[EMB_VOCAB, c], -3.0, 3.0, None)?;
            let (pos, pa) = cx.input(&[EMB_POSITIONS + 2, c], -1.0, 1.0, None)?;
            let (ids, ia) = cx.ints(r, 0, EMB_VOCAB as i32)?;
            // -1 is OPT's padding position (row 1 of the table).
            let (pids, pia) = cx.ints(r, -1, EMB_POSITIONS as i32)?;
            let want = cx.want(|| refr::embedding_fwd(&tok, &pos, c, &ids, &pids));
            let (out, ya) = cx.output("y", &[r, c], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, consts| {
                    k::embedding_fwd::launch_with(
                        l,
                        consts,
                        &k::embedding_fwd::Args {
                            tok: &ta,
                            pos: &pa,
                            ids: &ia,
                            pos_ids: &pia,
                            y: &ya,
                        },
                    )
                }),
                bytes: 3 * r * c * e + 8 * r,
            }
        }
        "causal_softmax" => {
            // dims: (heads, sequence length); `s` is `[heads * len, len]`.
            let (heads, len) = dims;
            let rows = heads * len;
            let (s, sa) = cx.input(&[rows, len], -8.0, 8.0, Some(Storage::F32))?;
            let (p, l) = if cx.with_ref {
                refr::causal_softmax(&s, rows, len)
            } else {
                (vec![], vec![])
            };
            let (op, pa) = cx.output("p", &[rows, len], None, p, false)?;
            let (ol, la) = cx.output("lse", &[rows], Some(Storage::F32), l, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![op, ol],
                launch: Box::new(move |l, consts| {
                    k::causal_softmax::launch_with(
                        l,
                        consts,
                        &k::causal_softmax::Args {
                            s: &sa,
                            p: &pa,
                            lse: &la,
                        },
                    )
                }),
                // The visible half of the scores, all of `p`, `lse`.
                bytes: heads * len * (len + 1) / 2 * 4 + rows * len * e + rows * 4,
            }
        }
        "softmax_bwd" => {
            // Genuine probability rows: softmax of random scores, rounded to the run's type.
            let scores = cx.rng.uniform(r * c, -4.0, 4.0);
            let p = round(cx.dtype, &refr::softmax(&scores, r, c));
            let pa = cx.input_from(&[r, c], cx.dtype, &p)?;
            let (dp, dpa) = cx.input(&[r, c], -3.0, 3.0, Some(Storage::F32))?;
            let want = cx.want(|| refr::softmax_bwd(&p, &dp, r, c));
            let (out, dsa) = cx.output("ds", &[r, c], None, want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![out],
                launch: Box::new(move |l, consts| {
                    k::softmax_bwd::launch_with(
                        l,
                        consts,
                        &k::softmax_bwd::Args {
                            p: &pa,
                            dp: &dpa,
                            ds: &dsa,
                        },
                    )
                }),
                bytes: r * c * (2 * e + 4),
            }
        }
        "xent_fwd_bwd" => {
            // About a fifth of the targets ignored (-100); the others anywhere in the vocab.
            let tg: Vec<i32> = cx
                .rng
                .uniform(r, -(c as f32) / 4.0 - 1.0, c as f32)
                .iter()
                .map(|x| (x.floor() as i32).min(c as i32 - 1))
                .map(|t| if t < 0 { -100 } else { t })
                .collect();
            let tf: Vec<f32> = tg.iter().map(|t| *t as f32).collect();
            let ta = cx.input_from(&[r], Storage::I32, &tf)?;
            let scale = 0.25f32;
            let (z, za) = cx.input(&[r, c], -8.0, 8.0, Some(Storage::F32))?;
            let (dz, loss) = if cx.with_ref {
                refr::xent_fwd_bwd(&z, r, c, &tg, scale)
            } else {
                (vec![], vec![])
            };
            let (oz, dza) = cx.output("dz", &[r, c], None, dz, false)?;
            let (ol, la) = cx.output("loss", &[r], Some(Storage::F32), loss, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![oz, ol],
                launch: Box::new(move |l, consts| {
                    k::xent_fwd_bwd::launch_with(
                        l,
                        consts,
                        &k::xent_fwd_bwd::Args {
                            z: &za,
                            targets: &ta,
                            loss: &la,
                            scale,
                            dz: &dza,
                        },
                    )
                }),
                bytes: r * c * (4 + e) + 8 * r,
            }
        }
        "adamw" => {
            let n = r;
            let f32s = Some(Storage::F32);
            // Step 10 of torch's defaults, with a larger learning rate so that the update is
            // well above the parameter's rounding.
            // Step 10 of torch's defaults, clipped (gradient scale 0.7).
            let s = refr::AdamwStep {
                grad_scale: 0.7,
                ..refr::AdamwStep::at(1e-2, 0.9, 0.999, 1e-8, 1e-2, 10)
            };
            let (g, ga) = cx.input(&[n], -3.0, 3.0, None)?;
            let (p, pa, mut op) = cx.in_place("param", &[n], -3.0, 3.0, f32s)?;
            let (m, ma, mut om) = cx.in_place("m", &[n], -1.0, 1.0, f32s)?;
            let (v, va, mut ov) = cx.in_place("v", &[n], 0.01, 2.0, f32s)?;
            if cx.with_ref {
                (op.want, om.want, ov.want) = refr::adamw(&p, &g, &m, &v, &s);
            }
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![op, om, ov],
                launch: Box::new(move |l, consts| {
                    k::adamw::launch_with(
                        l,
                        consts,
                        &k::adamw::Args {
                            param: &pa,
                            grad: &ga,
                            grad_scale: s.grad_scale,
                            m: &ma,
                            v: &va,
                            lr: s.lr,
                            beta1: s.beta1,
                            beta2: s.beta2,
                            eps: s.eps,
                            weight_decay: s.weight_decay,
                            bias_correction1: s.bias_correction1,
                            bias_correction2_sqrt: s.bias_correction2_sqrt,
                        },
                    )
                }),
                bytes: n * (24 + e),
            }
        }
        "sum_squares" => {
            let n = r;
            let (x, xa) = cx.input(&[n], -3.0, 3.0, Some(Storage::F32))?;
            let chunk = SUM_SQUARES_CHUNK;
            let want = cx.want(|| refr::sum_squares(&x, chunk));
            let parts = n.div_ceil(chunk);
            let (o, oa) = cx.output("out", &[parts], Some(Storage::F32), want, false)?;
            Prepared {
                _inputs: std::mem::take(&mut cx.inputs),
                outputs: vec![o],
                launch: Box::new(move |l, consts| {
                    k::sum_squares::launch_with(
                        l,
                        consts,
                        &k::sum_squares::Args { x: &xa, out: &oa },
                    )
                }),
                bytes: 4 * n,
            }
        }
        other => {
            return Err(DeviceError::InvalidArgument(format!(
                "unknown kernel `{other}`"
            )))
        }
    })
}

/// Correctness shapes of this module's kernels (`None` for other kernels).
pub(super) fn check_shapes(kernel: &str) -> Option<Vec<(usize, usize)>> {
    Some(match kernel {
        "bias_add" | "bias_relu" | "dropout_mask" | "mul_inplace" => {
            vec![(1, 1), (1000, 1000), (333, 4100), (4096, 1024)]
        }
        "embedding_fwd" => vec![(1, 1), (1000, 768), (333, 4100), (4096, 1024)],
        // (heads, length): one block, both configurations' loops, the small one's single pass.
        "causal_softmax" => vec![(1, 1), (3, 100), (2, 2048), (1, 2100), (4, 300)],
        "softmax_bwd" => vec![(1, 1), (37, 1000), (64, 4096), (5, 10007), (100, 200)],
        // (rows, vocabulary): the fixtures' 8192 and OPT's 50272.
        "xent_fwd_bwd" => vec![(1, 1), (37, 8192), (64, 50272), (5, 10007), (100, 300)],
        _ => return None,
    })
}

/// Bandwidth shapes of this module's kernels (`None` for other kernels).
pub(super) fn bench_shape(kernel: &str) -> Option<(usize, usize)> {
    Some(match kernel {
        "bias_add" | "bias_relu" | "embedding_fwd" | "softmax_bwd" | "dropout_mask"
        | "mul_inplace" => (32768, 4096),
        "causal_softmax" => (12, 2048),
        "xent_fwd_bwd" => (2048, 50272),
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
