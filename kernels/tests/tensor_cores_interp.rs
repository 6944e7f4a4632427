//! The tensor-core kernels (dense GEMMs, block-sparse GEMMs, fused LoRA), run in the
//! interpreter, against their f64 CPU references in `lexp_kernels::reference_matmul`.
//!
//! Shapes are random multiples of 8 (these kernels take 16-byte aligned tensors only) that are
//! mostly not multiples of the 128 x 128 x 32 tiles; block lists are random, with one empty
//! group; outputs are poisoned (or, where a kernel must leave slots untouched, filled with a
//! sentinel that the reference keeps). Every compiled tile configuration of a kernel computes
//! the same function; the properties draw one per case.
//!
//! Each property runs 6 cases (the interpreter runs whole 128 x 128 tiles); set
//! `PROPTEST_CASES` to run more.

use lexp_compiler::dtype::{round_to, Storage};
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference::{compare, POISON};
use lexp_kernels::reference_matmul as rm;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DTYPES: [Storage; 2] = [Storage::BF16, Storage::F16];

fn config() -> ProptestConfig {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default().cases,
        Err(_) => 6,
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A multiple of 8 in `8..=max` (one time in four an exact tile multiple or a neighbour).
fn dim(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => (1..=max / 8).prop_map(|x| x * 8), 1 => prop::sample::select(&[120usize, 128, 136][..])]
}

struct Data(StdRng);

impl Data {
    fn tensor(&mut self, dtype: Storage, dims: &[usize]) -> HostTensor {
        let v: Vec<f32> = (0..dims.iter().product())
            .map(|_| self.0.gen_range(-1.0f32..=1.0))
            .collect();
        HostTensor::new(dtype, dims, &v)
    }
}

fn filled(dtype: Storage, dims: &[usize], v: f32) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![v; dims.iter().product()])
}

/// Relative L2 tolerance of a `dtype` output of an f32-accumulated product: the final rounding
/// (2^-8 / 2^-11) plus f32 summation.
fn tol(dtype: Storage) -> f64 {
    match dtype {
        Storage::BF16 => 2f64.powi(-8) + 1e-5,
        Storage::F16 => 2f64.powi(-11) + 1e-5,
        _ => 1e-5,
    }
}

fn run(what: &str, r: Result<(), LaunchError>) -> Result<(), TestCaseError> {
    r.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
}

fn check(what: &str, got: &HostTensor, want: &[f32], rtol: f64) -> Result<(), TestCaseError> {
    let d = compare(&got.data, want);
    if d.non_finite == 0 && d.unwritten == 0 && d.rel_l2 <= rtol {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: {d} (tolerance {rtol:.1e})"
        )))
    }
}

/// The `pick`-th compiled configuration of `kernel` (modulo their number).
fn config_of(kernel: &str, pick: usize) -> Vec<(&'static str, usize)> {
    let all = k::find(kernel)
        .map(|k| k.configurations())
        .unwrap_or_default();
    all.get(pick % all.len().max(1))
        .cloned()
        .unwrap_or_default()
}

/// The `pick`-th compiled configuration of `kernel` that has `fixed`.
fn config_with(kernel: &str, pick: usize, fixed: (&str, usize)) -> Vec<(&'static str, usize)> {
    let all: Vec<_> = k::find(kernel)
        .map(|k| k.configurations())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.iter().any(|(n, v)| *n == fixed.0 && *v == fixed.1))
        .collect();
    all.get(pick % all.len().max(1))
        .cloned()
        .unwrap_or_default()
}

/// A random block list: `counts` per group (group 1 empty when there are two or more) and
/// sorted distinct ids padded with -1 to `max` per group.
fn block_list(rng: &mut StdRng, groups: usize, nb: usize) -> (Vec<i32>, Vec<i32>, usize) {
    let max = nb.min(3) + 1;
    let mut counts = vec![];
    let mut idx = vec![-1i32; groups * max];
    for g in 0..groups {
        let c = if g == 1 {
            0
        } else {
            rng.gen_range(1..=nb.min(max))
        };
        let mut ids: Vec<i32> = (0..nb as i32).collect();
        for i in 0..c {
            let j = rng.gen_range(i..nb);
            ids.swap(i, j);
        }
        let mut chosen = ids[..c].to_vec();
        chosen.sort_unstable();
        idx[g * max..g * max + c].copy_from_slice(&chosen);
        counts.push(c as i32);
    }
    (counts, idx, max)
}

fn i32_tensor(dims: &[usize], v: &[i32]) -> HostTensor {
    let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, dims, &f)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gemm(seed: u64, m in dim(200), n in dim(200), kk in dim(96), pick in 0usize..64) {
        let mut data = Data(StdRng::seed_from_u64(seed));
        for dtype in DTYPES {
            for (name, ta, tb) in [("gemm_nn", false, false), ("gemm_nt", false, true), ("gemm_tn", true, false)] {
                let a = data.tensor(dtype, &if ta { [kk, m] } else { [m, kk] });
                let b = data.tensor(dtype, &if tb { [n, kk] } else { [kk, n] });
                let mut a = a;
                let mut b = b;
                let mut c = filled(dtype, &[m, n], POISON);
                let want = rm::matmul(&a.data, &b.data, m, kk, n, ta, tb);
                let cfg = config_of(name, pick);
                let what = format!("{name} {dtype:?} {m}x{n}x{kk} {cfg:?}");
                let r = match name {
                    "gemm_nn" => k::gemm_nn::interpret(&cfg, k::gemm_nn::HostArgs { a: &mut a, b: &mut b, c: &mut c }),
                    "gemm_nt" => k::gemm_nt::interpret(&cfg, k::gemm_nt::HostArgs { a: &mut a, b: &mut b, c: &mut c }),
                    _ => k::gemm_tn::interpret(&cfg, k::gemm_tn::HostArgs { a: &mut a, b: &mut b, c: &mut c }),
                };
                run(&what, r)?;
                check(&what, &c, &want, tol(dtype))?;
            }
        }
    }

    #[test]
    fn block_sparse(seed: u64, m in dim(300), kk in dim(96), nb in 1usize..5, pick in 0usize..64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let groups = m.div_ceil(128);
        let (counts, idx, max) = block_list(&mut rng, groups, nb);
        let mut data = Data(rng);
        let dtype = if seed % 2 == 0 { Storage::BF16 } else { Storage::F16 };
        for bs in [64usize, 128] {
            let f = nb * bs;
            let mut tc = i32_tensor(&[groups], &counts);
            let mut ti = i32_tensor(&[groups, max], &idx);
            // Output blocks selected.
            let mut x = data.tensor(dtype, &[m, kk]);
            let mut w = data.tensor(dtype, &[f, kk]);
            let mut h = filled(dtype, &[m, max * bs], 7.0);
            let init = h.data.clone();
            let cfg = config_with("sparse_out", pick, ("BS", bs));
            let want = rm::sparse_out(&x.data, &w.data, m, kk, f, &counts, &idx, max, 128, bs, &init);
            let what = format!("sparse_out {dtype:?} m={m} k={kk} blocks={nb}x{bs}");
            run(&what, k::sparse_out::interpret(&cfg, k::sparse_out::HostArgs {
                x: &mut x, w: &mut w, counts: &mut tc, indices: &mut ti, h: &mut h,
            }))?;
            check(&what, &h, &want, tol(dtype))?;
            // Reduction blocks selected.
            let n = 136;
            let mut hc = data.tensor(dtype, &[m, max * bs]);
            let mut w2 = data.tensor(dtype, &[n, f]);
            let mut y = filled(dtype, &[m, n], POISON);
            let want = rm::sparse_red(&hc.data, &w2.data, m, n, f, &counts, &idx, max, 128, bs);
            let what = format!("sparse_red {dtype:?} m={m} blocks={nb}x{bs}");
            run(&what, k::sparse_red::interpret(&config_with("sparse_red", pick, ("BS", bs)), k::sparse_red::HostArgs {
                h: &mut hc, w2: &mut w2, counts: &mut tc, indices: &mut ti, y: &mut y,
            }))?;
            check(&what, &y, &want, tol(dtype))?;
            // Both selected (the output list over a 2-block weight).
            let (co, io, maxo) = block_list(&mut data.0, groups, 2);
            let mut tco = i32_tensor(&[groups], &co);
            let mut tio = i32_tensor(&[groups, maxo], &io);
            let mut wb = data.tensor(dtype, &[2 * bs, f]);
            let mut o = filled(dtype, &[m, maxo * bs], 7.0);
            let init_o = o.data.clone();
            let want = rm::sparse_both(
                &hc.data, &wb.data, m, 2 * bs, f, &co, &io, maxo, &counts, &idx, max, 128, bs, &init_o,
            );
            let what = format!("sparse_both {dtype:?} m={m} blocks={nb}x{bs}");
            run(&what, k::sparse_both::interpret(&config_with("sparse_both", pick, ("BS", bs)), k::sparse_both::HostArgs {
                h: &mut hc, w: &mut wb, counts_o: &mut tco, indices_o: &mut tio,
                counts_i: &mut tc, indices_i: &mut ti, out: &mut o,
            }))?;
            check(&what, &o, &want, tol(dtype))?;
        }
    }

    #[test]
    fn lora(seed: u64, m in dim(200), kk in dim(96), n in dim(160), pick in 0usize..64) {
        let mut data = Data(StdRng::seed_from_u64(seed));
        let r = 16;
        let s = 2.0f32;
        for dtype in DTYPES {
            let round = |v: f64| round_to(dtype.dtype(), v as f32);
            let mut x = data.tensor(dtype, &[m, kk]);
            let mut w = data.tensor(dtype, &[n, kk]);
            let mut bias = data.tensor(dtype, &[n]);
            let mut a = data.tensor(dtype, &[r, kk]);
            let mut b = data.tensor(dtype, &[n, r]);
            let mut y = filled(dtype, &[m, n], POISON);
            let mut xa = filled(dtype, &[m, r], POISON);
            let what = format!("lora_fwd {dtype:?} {m}x{kk} -> {n}");
            run(&what, k::lora_fwd::interpret(&config_of("lora_fwd", pick), k::lora_fwd::HostArgs {
                x: &mut x, w: &mut w, bias: &mut bias, a: &mut a, b: &mut b, s, y: &mut y, xa: &mut xa,
            }))?;
            let (wy, wxa) = rm::lora_fwd(&x.data, &w.data, Some(&bias.data), &a.data, &b.data, s, m, kk, n, r, round);
            check(&format!("{what}: xa"), &xa, &wxa, tol(dtype))?;
            check(&format!("{what}: y"), &y, &wy, tol(dtype))?;
            let mut dy = data.tensor(dtype, &[m, n]);
            let mut dx = filled(dtype, &[m, kk], POISON);
            let mut u = filled(dtype, &[m, r], POISON);
            let what = format!("lora_bwd_dx {dtype:?} {m}x{n} -> {kk}");
            run(&what, k::lora_bwd_dx::interpret(&config_of("lora_bwd_dx", pick), k::lora_bwd_dx::HostArgs {
                dy: &mut dy, w: &mut w, a: &mut a, b: &mut b, s, dx: &mut dx, u: &mut u,
            }))?;
            let (wdx, wu) = rm::lora_bwd_dx(&dy.data, &w.data, &a.data, &b.data, s, m, kk, n, r, round);
            check(&format!("{what}: u"), &u, &wu, tol(dtype))?;
            check(&format!("{what}: dx"), &dx, &wdx, tol(dtype))?;
            // Weight gradients from the kernels' own u and xa (f32 outputs, zeroed first).
            let mut da = filled(Storage::F32, &[r, kk], 0.0);
            let what = format!("lora_grad dA {dtype:?}");
            run(&what, k::lora_grad::interpret(&[("BP", 16)], k::lora_grad::HostArgs {
                a: &mut u, b: &mut x, c: &mut da,
            }))?;
            check(&what, &da, &rm::lora_grad_a(&u.data, &x.data, m, kk, r), 1e-5)?;
            let mut db = filled(Storage::F32, &[n, r], 0.0);
            let what = format!("lora_grad dB {dtype:?}");
            run(&what, k::lora_grad::interpret(&[("BQ", 16)], k::lora_grad::HostArgs {
                a: &mut dy, b: &mut xa, c: &mut db,
            }))?;
            check(&what, &db, &rm::lora_grad_b(&dy.data, &xa.data, m, n, r), 1e-5)?;
        }
    }
    /// The LoRA branch kernels chained as the engine runs them: `u = x·Aᵀ`, `y += s·u·Bᵀ`
    /// through `Bᵀ` from `transpose`, then `du = s·dy·B` and `dx += du·A`, at every rank up to
    /// 16 (padded to a multiple of 8), with `u`/`du` poisoned first (their padding must come
    /// out zero) and `y`/`dx` holding random values that the expand adds to.
    #[test]
    fn lora_branch(seed: u64, m in dim(200), kk in dim(96), n in dim(160), r in 1usize..=16, pick in 0usize..64) {
        let mut data = Data(StdRng::seed_from_u64(seed));
        let rp = r.div_ceil(8) * 8;
        let s = 2.0f32;
        for dtype in DTYPES {
            let round = |v: f64| round_to(dtype.dtype(), v as f32);
            let mut x = data.tensor(dtype, &[m, kk]);
            let mut a = data.tensor(dtype, &[r, kk]);
            let b = data.tensor(dtype, &[n, r]);
            // Bᵀ, as the engine makes it once per step for every module in one launch: here B
            // and a second module's [24, r] behind a gap, into a sentinel-filled buffer whose
            // gaps must keep the sentinel.
            let gap = 8;
            let len = n * r + gap + 24 * r + gap;
            let second = data.tensor(dtype, &[24 * r]);
            let mut src = vec![0.0f32; len];
            src[..n * r].copy_from_slice(&b.data);
            src[n * r + gap..n * r + gap + 24 * r].copy_from_slice(&second.data);
            let mut flat = HostTensor::new(dtype, &[len], &src);
            let mut out = filled(dtype, &[len], 7.0);
            let mut offs = HostTensor::new(Storage::I32, &[2], &[0.0, (n * r + gap) as f32]);
            let mut rws = HostTensor::new(Storage::I32, &[2], &[n as f32, 24.0]);
            run("transpose_b", k::transpose_b::interpret(&[], k::transpose_b::HostArgs {
                x: &mut flat, offs: &mut offs, rows: &mut rws, r: r as i64, y: &mut out,
            }))?;
            let mut want = vec![7.0f32; len];
            for (off, rows_m) in [(0, n), (n * r + gap, 24)] {
                for i in 0..rows_m * r {
                    want[off + i] = src[off + (i % rows_m) * r + i / rows_m];
                }
            }
            prop_assert_eq!(&out.data, &want);
            let mut bt = HostTensor::new(dtype, &[r, n], &out.data[..r * n]);

            let what = format!("lora_down u {dtype:?} {m}x{kk} r={r}");
            let mut u = filled(dtype, &[m, rp], POISON);
            run(&what, k::lora_down::interpret(&config_of("lora_down", pick), k::lora_down::HostArgs {
                x: &mut x, w: &mut a, s: 1.0, u: &mut u,
            }))?;
            let wu = rm::lora_down(&x.data, &a.data, 1.0, m, kk, r, rp, round);
            check(&what, &u, &wu, tol(dtype))?;
            prop_assert!((0..m).all(|i| (r..rp).all(|j| u.data[i * rp + j] == 0.0)), "{}: padding", what);

            let what = format!("lora_expand y {dtype:?} {m}x{n} r={r}");
            let mut y = data.tensor(dtype, &[m, n]);
            let y0 = y.data.clone();
            run(&what, k::lora_expand::interpret(&config_of("lora_expand", pick), k::lora_expand::HostArgs {
                u: &mut u, w: &mut bt, s, y: &mut y,
            }))?;
            check(&what, &y, &rm::lora_expand(&y0, &u.data, &bt.data, s, m, n, r, rp), tol(dtype))?;

            let what = format!("lora_down du {dtype:?} {m}x{n} r={r}");
            let mut dy = data.tensor(dtype, &[m, n]);
            let mut du = filled(dtype, &[m, rp], POISON);
            run(&what, k::lora_down::interpret(&config_of("lora_down", pick + 1), k::lora_down::HostArgs {
                x: &mut dy, w: &mut bt, s, u: &mut du,
            }))?;
            check(&what, &du, &rm::lora_down(&dy.data, &bt.data, s, m, n, r, rp, round), tol(dtype))?;

            let what = format!("lora_expand dx {dtype:?} {m}x{kk} r={r}");
            let mut dx = data.tensor(dtype, &[m, kk]);
            let dx0 = dx.data.clone();
            run(&what, k::lora_expand::interpret(&config_of("lora_expand", pick + 1), k::lora_expand::HostArgs {
                u: &mut du, w: &mut a, s: 1.0, y: &mut dx,
            }))?;
            check(&what, &dx, &rm::lora_expand(&dx0, &du.data, &a.data, 1.0, m, kk, r, rp), tol(dtype))?;

            // Weight gradients, split over `chunks` token chunks and reduced in order into
            // gradients that already hold values: dB += s·dyᵀ·u ([n, r]), dA += duᵀ·x ([r, kk]).
            let compact = |t: &HostTensor| -> Vec<f32> {
                (0..m * r).map(|i| t.data[(i / r) * rp + i % r]).collect()
            };
            let chunks = 1 + (seed % 4) as usize;
            for (name, rank_side, wide, q, tr, scale) in [
                ("dB", &mut u, &mut dy, n, 0usize, s),
                ("dA", &mut du, &mut x, kk, 1, 1.0),
            ] {
                let what = format!("lora_wgrad {name} {dtype:?} {m} tokens, {q} wide, r={r}, {chunks} chunks");
                let mut part = filled(Storage::F32, &[chunks * q, rp], f32::NAN);
                run(&what, k::lora_wgrad::interpret(&config_of("lora_wgrad", pick), k::lora_wgrad::HostArgs {
                    a: rank_side, b: wide, part: &mut part,
                }))?;
                let mut g = data.tensor(Storage::F32, &[q * r]);
                let g0 = g.data.clone();
                let mut flat = HostTensor::new(Storage::F32, &[chunks, q * rp], &part.data);
                run(&what, k::lora_wgrad_reduce::interpret(&[], k::lora_wgrad_reduce::HostArgs {
                    part: &mut flat, q: q as i64, r: r as i64, rp: rp as i64, tr: tr as i64, s: scale, g: &mut g,
                }))?;
                let cu = compact(rank_side);
                let grad = if tr == 0 {
                    rm::lora_grad_b(&wide.data, &cu, m, q, r)
                } else {
                    rm::lora_grad_a(&cu, &wide.data, m, q, r)
                };
                let want: Vec<f32> = g0.iter().zip(&grad).map(|(a, b)| a + scale * b).collect();
                check(&what, &g, &want, 1e-5)?;
            }

            // Both passes in one launch (`lora_wgrad_pair`: dB over dy and dA over a second
            // [m, n] input, as the LoRA fold pairs them), then `lora_wgrad_reduce_many` in its
            // writing form (`acc = 0`) into NaN-poisoned gradients: [dB [n, r] | dA [r, n]].
            let what = format!("lora_wgrad_pair {dtype:?} {m} tokens, {n} wide, r={r}, {chunks} chunks");
            let mut x2 = data.tensor(dtype, &[m, n]);
            let mut part = filled(Storage::F32, &[2 * chunks * n, rp], f32::NAN);
            run(&what, k::lora_wgrad_pair::interpret(&config_of("lora_wgrad_pair", pick), k::lora_wgrad_pair::HostArgs {
                a0: &mut u, b0: &mut dy, a1: &mut du, b1: &mut x2, part: &mut part,
            }))?;
            let mut flat = HostTensor::new(Storage::F32, &[2 * chunks, n * rp], &part.data);
            let mut mods = i32_tensor(&[2, 5], &rm::PairCase::mods_i32(n, r));
            let mut g = filled(Storage::F32, &[2 * n * r], f32::NAN);
            run(&what, k::lora_wgrad_reduce_many::interpret(&[], k::lora_wgrad_reduce_many::HostArgs {
                part: &mut flat, mods: &mut mods, q: n as i64, r: r as i64, w: rp as i64,
                n: (n * r) as i64, chunks: chunks as i64, s, acc: 0, g: &mut g,
            }))?;
            let want = rm::PairCase::want((&dy.data, &compact(&u)), (&compact(&du), &x2.data), (m, n, r), s);
            check(&what, &g, &want, 1e-5)?;
        }
    }

    /// The fold's reduces in one launch (`rm::ReduceManyCase`: two `dB` blocks and the shared
    /// `dA` blocks, at every rank up to 16), into gradients that already hold
    /// values, against the reference; the gradient elements no module names keep theirs.
    #[test]
    fn lora_wgrad_reduce_many(seed: u64, q in 1usize..=40, r in 1usize..=16, chunks in 1usize..=16) {
        let mut data = Data(StdRng::seed_from_u64(seed));
        let s = 1.5f32;
        let case = rm::ReduceManyCase::new(q, r, chunks, |n| data.tensor(Storage::F32, &[n]).data);
        let (_, _, w, _) = case.dims;
        let n = q * r;
        let mut g = HostTensor::new(Storage::F32, &[case.g0.len()], &case.g0);
        let mut part = HostTensor::new(Storage::F32, &[case.blocks * chunks, q * w], &case.part);
        run("lora_wgrad_reduce_many", k::lora_wgrad_reduce_many::interpret(&[], k::lora_wgrad_reduce_many::HostArgs {
            part: &mut part, mods: &mut i32_tensor(&[4, 5], &case.mods_i32()), q: q as i64, r: r as i64,
            w: w as i64, n: n as i64, chunks: chunks as i64, s, acc: 1, g: &mut g,
        }))?;
        check("lora_wgrad_reduce_many", &g, &case.want(s), 1e-5)?;
        prop_assert_eq!(&g.data[n..n + 3], &case.g0[n..n + 3]);
        prop_assert_eq!(&g.data[4 * n + 3..], &case.g0[4 * n + 3..]);
    }

    /// One layer's q/k/v branches folded into the room of its fused projection `W'` (one to
    /// three targets in a random slot order, then empty slots up to `slots`, as the runtime
    /// pads the fold's K), into a sentinel-filled `W'`, against the reference; and the product
    /// the fold exists for: `[x | u]·W'ᵀ` equals `x·Wᵀ` plus each target's `s·u·Bᵀ` in its
    /// own rows, with `u = x·A'ᵀ` from the room's rows.
    #[test]
    fn lora_fold(seed: u64, k8 in 1usize..=6, r in 1usize..=16, targets in 1usize..=3, pad in 0usize..=2, m in 1usize..=12) {
        let mut data = Data(StdRng::seed_from_u64(seed));
        let (k, rp, s) = (8 * k8, r.div_ceil(8) * 8, 2.0f32);
        let slots = targets + pad;
        let (rows, ld) = (3 * k, k + slots * rp + 8);
        // The engine gives its targets the first slots, in some order.
        let mut order: Vec<usize> = (0..targets).collect();
        order.rotate_left(seed as usize % targets);
        for dtype in DTYPES {
            // Three modules' A [r, k] and B [k, r] behind gaps in the flat parameters.
            let gap = 8;
            let per = r * k + gap + k * r + gap;
            let mut x = data.tensor(dtype, &[3 * per]);
            let w0 = data.tensor(dtype, &[(rows + slots * rp) * ld]);
            let mut y = HostTensor::new(dtype, &[(rows + slots * rp) * ld], &w0.data);
            for v in y.data.iter_mut().enumerate().filter(|(i, _)| i % ld >= k || i / ld >= rows) {
                *v.1 = 7.0;
            }
            let y0 = y.data.clone();
            let mut t: Vec<[usize; 5]> = (0..targets)
                .map(|q| [q * per, q * per + r * k + gap, q * k, order[q], r])
                .collect();
            t.extend((targets..slots).map(|j| [0, 0, 0, j, 0]));
            let flat: Vec<i32> = t.iter().flatten().map(|&v| v as i32).collect();
            let mut offs = i32_tensor(&[slots, 5], &flat);
            run("lora_fold", k::lora_fold::interpret(&[("RP", rp)], k::lora_fold::HostArgs {
                x: &mut x, offs: &mut offs, k: k as i64, n: k as i64,
                rows: rows as i64, ld: ld as i64, s, y: &mut y,
            }))?;
            let round = |v: f64| round_to(dtype.dtype(), v as f32);
            let want = rm::lora_fold(&x.data, &t, (rp, k, k), (rows, ld), s, &y0, round);
            prop_assert_eq!(&y.data, &want);

            // [xin | u]·W'ᵀ against xin·Wᵀ + s·u·Bᵀ (f64; s·B exact for s = 2), over every
            // slot's columns, the empty ones included.
            let xin = data.tensor(dtype, &[m, k]);
            let kc = slots * rp;
            let mut xu = vec![0.0f64; m * (k + kc)];
            for i in 0..m {
                for c in 0..k {
                    xu[i * (k + kc) + c] = xin.data[i * k + c] as f64;
                }
                for j in 0..kc {
                    xu[i * (k + kc) + k + j] = (0..k)
                        .map(|c| xin.data[i * k + c] as f64 * y.data[(rows + j) * ld + c] as f64)
                        .sum();
                }
            }
            for (q, tq) in t.iter().take(targets).enumerate() {
                for i in 0..m {
                    for o in q * k..(q + 1) * k {
                        let got: f64 = (0..k + kc).map(|c| xu[i * (k + kc) + c] * y.data[o * ld + c] as f64).sum();
                        let base: f64 = (0..k).map(|c| xin.data[i * k + c] as f64 * w0.data[o * ld + c] as f64).sum();
                        let branch: f64 = (0..r)
                            .map(|a| {
                                let u: f64 = (0..k).map(|c| xin.data[i * k + c] as f64 * x.data[tq[0] + a * k + c] as f64).sum();
                                u * x.data[tq[1] + (o - q * k) * r + a] as f64
                            })
                            .sum();
                        let want = base + s as f64 * branch;
                        prop_assert!((got - want).abs() <= 1e-9 * (1.0 + want.abs()), "row {} token {}: {} vs {}", o, i, got, want);
                    }
                }
            }
        }
    }
}

/// A tensor whose rows are not a multiple of 16 bytes cannot use these kernels: the launcher
/// says which one and why, before anything runs.
#[test]
fn unaligned_tensors_are_rejected_with_the_reason() {
    let mut a = HostTensor::new(Storage::BF16, &[16, 12], &[0.5; 16 * 12]);
    let mut b = HostTensor::new(Storage::BF16, &[12, 16], &[0.5; 12 * 16]);
    let mut c = HostTensor::new(Storage::BF16, &[16, 16], &[0.0; 256]);
    // The interpreter accepts any alignment (it has no vector accesses); the GPU launcher
    // checks the pointers, dims and strides.
    k::gemm_nn::interpret(
        &[],
        k::gemm_nn::HostArgs {
            a: &mut a,
            b: &mut b,
            c: &mut c,
        },
    )
    .expect("interpreter");
    let args = [a.as_arg(), b.as_arg(), c.as_arg()];
    let refs: Vec<&lexp_compiler::launch::TensorArg> = args.iter().collect();
    let err = lexp_compiler::launch::select_variant(
        "gemm_nn",
        &k::gemm_nn::VARIANTS,
        k::gemm_nn::TENSORS,
        &refs,
        k::gemm_nn::CONSTS,
        &[],
        None,
    )
    .map(|_| ())
    .expect_err("rows of 12 bf16 are 24 bytes");
    let msg = err.to_string();
    assert!(
        msg.contains("argument `a`") && msg.contains("16-byte aligned"),
        "{msg}"
    );
}
