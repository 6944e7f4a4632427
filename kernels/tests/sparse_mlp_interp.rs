//! The dynamic-aware MLP operators (`sparse_fc1_fwd`, `sparse_fc2_fwd`, `sparse_fc2_dh`,
//! `sparse_fc1_dx`, `sparse_colsum`), run
//! in the interpreter, against their f64 CPU references in
//! `lexp_kernels::reference_sparse_mlp`; and the four sparse products chained (with
//! `sparse_red` for fc2 forward) against the masked dense MLP.
//!
//! Token counts are random and mostly not multiples of the 128-row group (the last group is
//! ragged); hidden sizes are random multiples of 8 (the kernels take 16-byte aligned rows).
//! Block lists are random per group (ragged counts, unsorted distinct ids, padding of -1 past
//! the count, group 1 always empty, sometimes every group empty). Outputs are poisoned, or
//! filled with a sentinel where slots past a count must stay untouched. Every compiled tile
//! configuration computes the same function; each case draws one.
//!
//! Each property runs 6 cases (the interpreter runs whole tiles); set `PROPTEST_CASES` to run
//! more.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference::{compare, POISON};
use lexp_kernels::reference_matmul as rm;
use lexp_kernels::reference_sparse_mlp::{self as rs, Blocks};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BM: usize = 128;
const SENTINEL: f32 = 7.0;

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

/// A token count in `1..=max`: mostly arbitrary (ragged last group), sometimes a group
/// multiple or its neighbours.
fn tokens(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![3 => 1..=max, 1 => prop::sample::select(&[127usize, 128, 129, 256][..])]
}

/// A multiple of 8 in `8..=max`.
fn dim8(max: usize) -> impl Strategy<Value = usize> {
    (1..=max / 8).prop_map(|x| x * 8)
}

fn tensor(rng: &mut StdRng, dtype: Storage, dims: &[usize]) -> HostTensor {
    let v: Vec<f32> = (0..dims.iter().product())
        .map(|_| rng.gen_range(-1.0f32..=1.0))
        .collect();
    HostTensor::new(dtype, dims, &v)
}

fn filled(dtype: Storage, dims: &[usize], v: f32) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![v; dims.iter().product()])
}

fn ints(dims: &[usize], v: &[i32]) -> HostTensor {
    let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, dims, &f)
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

fn check(what: &str, got: &[f32], want: &[f32], rtol: f64) -> Result<(), TestCaseError> {
    let d = compare(got, want);
    if d.non_finite == 0 && d.unwritten == 0 && d.rel_l2 <= rtol {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: {d} (tolerance {rtol:.1e})"
        )))
    }
}

/// Slots past each group's count (and rows of empty groups) still hold the sentinel.
fn untouched(what: &str, got: &[f32], m: usize, list: &List) -> Result<(), TestCaseError> {
    let width = list.max * list.bs;
    for r in 0..m {
        let count = list.counts[r / BM] as usize;
        let tail = &got[r * width + count * list.bs..(r + 1) * width];
        if let Some(v) = tail.iter().find(|&&v| v != SENTINEL) {
            return Err(TestCaseError::fail(format!(
                "{what}: row {r}, a slot past count {count} was written ({v})"
            )));
        }
    }
    Ok(())
}

/// A random block list over `nb` blocks of `bs`: ragged counts in `0..=max`, distinct ids in
/// random order, -1 padding; group 1 is empty and with `all_empty` every group is.
struct List {
    counts: Vec<i32>,
    idx: Vec<i32>,
    max: usize,
    bs: usize,
}

impl List {
    fn random(rng: &mut StdRng, groups: usize, nb: usize, bs: usize, all_empty: bool) -> List {
        let max = nb.min(4);
        let mut counts = vec![];
        let mut idx = vec![-1i32; groups * max];
        for g in 0..groups {
            let c = if g == 1 || all_empty {
                0
            } else {
                rng.gen_range(0..=max)
            };
            let mut ids: Vec<i32> = (0..nb as i32).collect();
            for i in 0..c {
                let j = rng.gen_range(i..nb);
                ids.swap(i, j);
            }
            idx[g * max..g * max + c].copy_from_slice(&ids[..c]);
            counts.push(c as i32);
        }
        List {
            counts,
            idx,
            max,
            bs,
        }
    }

    fn blocks(&self) -> Blocks<'_> {
        Blocks {
            counts: &self.counts,
            indices: &self.idx,
            max_blocks: self.max,
            bm: BM,
            bs: self.bs,
        }
    }

    fn tensors(&self) -> (HostTensor, HostTensor) {
        let groups = self.counts.len();
        (
            ints(&[groups], &self.counts),
            ints(&[groups, self.max], &self.idx),
        )
    }
}

/// The `pick`-th compiled configuration of `kernel` with block size `bs`.
fn config_with_bs(kernel: &str, pick: usize, bs: usize) -> Vec<(&'static str, usize)> {
    let all: Vec<_> = k::find(kernel)
        .map(|k| k.configurations())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.iter().any(|(n, v)| *n == "BS" && *v == bs))
        .collect();
    assert!(
        !all.is_empty(),
        "{kernel} has no configuration with BS={bs}"
    );
    all[pick % all.len()].clone()
}

/// One case's inputs: shapes, a list, a dtype.
struct Case {
    rng: StdRng,
    dtype: Storage,
    nb: usize,
    list: List,
}

fn case(seed: u64, m: usize, nb: usize, bs: usize) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let all_empty = seed % 7 == 3;
    let list = List::random(&mut rng, m.div_ceil(BM), nb, bs, all_empty);
    let dtype = if seed.is_multiple_of(2) {
        Storage::BF16
    } else {
        Storage::F16
    };
    Case {
        rng,
        dtype,
        nb,
        list,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fc1_fwd(seed: u64, m in tokens(300), hd in dim8(96), nb in 1usize..6,
               bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f) = (c.dtype, nb * bs);
        let mut x = tensor(&mut c.rng, dtype, &[m, hd]);
        let mut w1 = tensor(&mut c.rng, dtype, &[f, hd]);
        let mut b1 = tensor(&mut c.rng, dtype, &[f]);
        let mut h = filled(dtype, &[m, c.list.max * bs], SENTINEL);
        let want = rs::sparse_fc1_fwd(&x.data, &w1.data, &b1.data, (m, hd, f), c.list.blocks(), &h.data);
        let cfg = config_with_bs("sparse_fc1_fwd", pick, bs);
        let what = format!("sparse_fc1_fwd {dtype:?} m={m} hd={hd} blocks={nb}x{bs} {cfg:?}");
        let (mut tc, mut ti) = c.list.tensors();
        run(&what, k::sparse_fc1_fwd::interpret(&cfg, k::sparse_fc1_fwd::HostArgs {
            x: &mut x, w1: &mut w1, b1: &mut b1, counts: &mut tc, indices: &mut ti, h: &mut h,
        }))?;
        check(&what, &h.data, &want, tol(dtype))?;
        untouched(&what, &h.data, m, &c.list)?;
    }

    #[test]
    fn fc2_dh(seed: u64, m in tokens(300), hd in dim8(96), nb in 1usize..6,
              bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f) = (c.dtype, nb * bs);
        let width = c.list.max * bs;
        let mut dy = tensor(&mut c.rng, dtype, &[m, hd]);
        let mut w2 = tensor(&mut c.rng, dtype, &[hd, f]);
        // A compact h with about half its entries <= 0 (the ReLU mask), some exactly 0.
        let mut h = tensor(&mut c.rng, dtype, &[m, width]);
        for v in h.data.iter_mut().step_by(5) {
            *v = 0.0;
        }
        let mut dh = filled(dtype, &[m, width], SENTINEL);
        let want = rs::sparse_fc2_dh(&dy.data, &w2.data, &h.data, (m, hd, f), c.list.blocks(), &dh.data);
        let cfg = config_with_bs("sparse_fc2_dh", pick, bs);
        let what = format!("sparse_fc2_dh {dtype:?} m={m} hd={hd} blocks={nb}x{bs} {cfg:?}");
        let (mut tc, mut ti) = c.list.tensors();
        run(&what, k::sparse_fc2_dh::interpret(&cfg, k::sparse_fc2_dh::HostArgs {
            dy: &mut dy, w2: &mut w2, h: &mut h, counts: &mut tc, indices: &mut ti, dh: &mut dh,
        }))?;
        check(&what, &dh.data, &want, tol(dtype))?;
        untouched(&what, &dh.data, m, &c.list)?;
        // Masked entries are exactly zero.
        for r in 0..m {
            let count = c.list.counts[r / BM] as usize;
            for s in 0..count * bs {
                let i = r * width + s;
                if h.data[i] <= 0.0 && dh.data[i] != 0.0 {
                    return Err(TestCaseError::fail(format!("{what}: dh[{r}, {s}] = {} where h <= 0", dh.data[i])));
                }
            }
        }
    }

    #[test]
    fn fc1_dx(seed: u64, m in tokens(300), hd in dim8(200), nb in 1usize..6,
              bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f) = (c.dtype, nb * bs);
        let mut dh = tensor(&mut c.rng, dtype, &[m, c.list.max * bs]);
        let mut w1 = tensor(&mut c.rng, dtype, &[f, hd]);
        let mut dx = filled(dtype, &[m, hd], POISON);
        let want = rs::sparse_fc1_dx(&dh.data, &w1.data, (m, hd, f), c.list.blocks());
        let cfg = config_with_bs("sparse_fc1_dx", pick, bs);
        let what = format!("sparse_fc1_dx {dtype:?} m={m} hd={hd} blocks={nb}x{bs} {cfg:?}");
        let (mut tc, mut ti) = c.list.tensors();
        run(&what, k::sparse_fc1_dx::interpret(&cfg, k::sparse_fc1_dx::HostArgs {
            dh: &mut dh, w1: &mut w1, counts: &mut tc, indices: &mut ti, dx: &mut dx,
        }))?;
        check(&what, &dx.data, &want, tol(dtype))?;
    }

    /// fc2 forward with bias and residual (hidden sizes up to 600: more than two 256-wide
    /// output tiles, the last one ragged).
    #[test]
    fn fc2_fwd(seed: u64, m in tokens(300), hd in dim8(600), nb in 1usize..6,
               bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f) = (c.dtype, nb * bs);
        let mut h = tensor(&mut c.rng, dtype, &[m, c.list.max * bs]);
        let mut w2 = tensor(&mut c.rng, dtype, &[hd, f]);
        let mut b2 = tensor(&mut c.rng, dtype, &[hd]);
        let mut res = tensor(&mut c.rng, dtype, &[m, hd]);
        let mut out = filled(dtype, &[m, hd], POISON);
        let want = rs::sparse_fc2_fwd(&h.data, &w2.data, &b2.data, &res.data, (m, hd, f), c.list.blocks());
        let cfg = config_with_bs("sparse_fc2_fwd", pick, bs);
        let what = format!("sparse_fc2_fwd {dtype:?} m={m} hd={hd} blocks={nb}x{bs} {cfg:?}");
        let (mut tc, mut ti) = c.list.tensors();
        run(&what, k::sparse_fc2_fwd::interpret(&cfg, k::sparse_fc2_fwd::HostArgs {
            h: &mut h, w2: &mut w2, b2: &mut b2, res: &mut res, counts: &mut tc, indices: &mut ti,
            out: &mut out,
        }))?;
        check(&what, &out.data, &want, tol(dtype))?;
    }

    /// fc1's bias gradient from the compact `dh`, added to a random f32 start (the kernel
    /// accumulates); the slots past each count hold NaN, which must not be read.
    #[test]
    fn colsum(seed: u64, m in tokens(300), nb in 1usize..6,
              bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f) = (c.dtype, nb * bs);
        let width = c.list.max * bs;
        let mut dh = tensor(&mut c.rng, dtype, &[m, width]);
        for r in 0..m {
            let count = c.list.counts[r / BM] as usize;
            dh.data[r * width + count * bs..(r + 1) * width].fill(POISON);
        }
        let mut out = tensor(&mut c.rng, Storage::F32, &[f]);
        let want = rs::sparse_colsum(&dh.data, (m, f), c.list.blocks(), &out.data);
        let cfg = config_with_bs("sparse_colsum", pick, bs);
        let what = format!("sparse_colsum {dtype:?} m={m} blocks={nb}x{bs} {cfg:?}");
        let (mut tc, mut ti) = c.list.tensors();
        run(&what, k::sparse_colsum::interpret(&cfg, k::sparse_colsum::HostArgs {
            dh: &mut dh, counts: &mut tc, indices: &mut ti, out: &mut out,
        }))?;
        // f32 accumulation of up to 128 rounded values per entry.
        check(&what, &out.data, &want, 1e-5)?;
    }

    /// fc1 forward, fc2 forward (`sparse_red`), fc2 input gradient, fc1 input gradient, each
    /// fed the previous kernel's output, against the masked dense MLP in f64.
    #[test]
    fn chain_is_the_masked_dense_mlp(seed: u64, m in tokens(280), hd in dim8(72), nb in 1usize..5,
                                     bs in prop::sample::select(&[64usize, 128][..]), pick in 0usize..64) {
        let mut c = case(seed, m, nb, bs);
        let (dtype, f, nbs) = (c.dtype, nb * bs, c.nb);
        let width = c.list.max * bs;
        let mut x = tensor(&mut c.rng, dtype, &[m, hd]);
        let mut w1 = tensor(&mut c.rng, dtype, &[f, hd]);
        let mut b1 = tensor(&mut c.rng, dtype, &[f]);
        let mut w2 = tensor(&mut c.rng, dtype, &[hd, f]);
        let mut dy = tensor(&mut c.rng, dtype, &[m, hd]);
        let (mut tc, mut ti) = c.list.tensors();
        let what = format!("chain {dtype:?} m={m} hd={hd} blocks={nbs}x{bs} pick {pick}");
        let mut h = filled(dtype, &[m, width], 0.0);
        run(&what, k::sparse_fc1_fwd::interpret(&config_with_bs("sparse_fc1_fwd", pick, bs), k::sparse_fc1_fwd::HostArgs {
            x: &mut x, w1: &mut w1, b1: &mut b1, counts: &mut tc, indices: &mut ti, h: &mut h,
        }))?;
        let mut y = filled(dtype, &[m, hd], POISON);
        run(&what, k::sparse_red::interpret(&config_with_bs("sparse_red", pick, bs), k::sparse_red::HostArgs {
            h: &mut h, w2: &mut w2, counts: &mut tc, indices: &mut ti, y: &mut y,
        }))?;
        let mut dh = filled(dtype, &[m, width], 0.0);
        run(&what, k::sparse_fc2_dh::interpret(&config_with_bs("sparse_fc2_dh", pick, bs), k::sparse_fc2_dh::HostArgs {
            dy: &mut dy, w2: &mut w2, h: &mut h, counts: &mut tc, indices: &mut ti, dh: &mut dh,
        }))?;
        let mut dx = filled(dtype, &[m, hd], POISON);
        run(&what, k::sparse_fc1_dx::interpret(&config_with_bs("sparse_fc1_dx", pick, bs), k::sparse_fc1_dx::HostArgs {
            dh: &mut dh, w1: &mut w1, counts: &mut tc, indices: &mut ti, dx: &mut dx,
        }))?;
        let list = c.list.blocks();
        let h_dense = rs::scatter(&h.data, (m, f), list);
        // The kept neurons; a pre-activation within f32 rounding of 0 may come out as 0 in the
        // kernel and positive in f64: the backward is exact given the forward the kernel made,
        // so such (very rare) neurons are dropped from the mask too.
        let keep: Vec<bool> = list.dense_mask(m, f).into_iter().zip(&h_dense).map(|(k, &v)| k && v > 0.0).collect();
        let zero_b2 = vec![0.0; hd];
        let want = rs::masked_mlp(&x.data, &w1.data, &b1.data, &w2.data, &zero_b2, &dy.data, &keep, (m, hd, f));
        // Intermediates are stored in `dtype` and reused, so the chain's outputs carry two or
        // three roundings: a multiple of the tolerance.
        check(&format!("{what}: h"), &h_dense, &want.h, tol(dtype))?;
        check(&format!("{what}: y"), &y.data, &want.y, 2.0 * tol(dtype))?;
        check(&format!("{what}: dh"), &rs::scatter(&dh.data, (m, f), list), &want.dh, 2.0 * tol(dtype))?;
        check(&format!("{what}: dx"), &dx.data, &want.dx, 3.0 * tol(dtype))?;
        // And the sparse references agree with the kernels step by step from the same inputs.
        let y_ref = rm::sparse_red(&h.data, &w2.data, m, hd, f, &c.list.counts, &c.list.idx, c.list.max, BM, bs);
        check(&format!("{what}: y from the kernel's h"), &y.data, &y_ref, tol(dtype))?;
    }
}
