//! The sparse MLP on the GPU, chained: fc1 forward with bias + ReLU on the kept blocks
//! (`sparse_fc1_fwd`), fc2 forward over the kept blocks (`sparse_red`, then `bias_add` for
//! `b2`), fc2's input gradient masked by the ReLU (`sparse_fc2_dh`) and fc1's input gradient
//! (`sparse_fc1_dx`), each fed the previous kernel's output, against a CPU reference of the
//! masked dense MLP (dropped blocks' activations zeroed). And the operations refuse block
//! lists that do not fit before anything is launched.
//!
//! Opt-in: does nothing unless `LEXP_GPU_TESTS=1` (run the binary on the GPU machine, like
//! `gpu_sparse_ops`).

use lexp_compiler::dtype::Storage;
use lexp_kernels as k;
use lexp_kernels::reference::{compare, tolerance};
use lexp_kernels::reference_sparse_mlp::{self as rs, Blocks};
use lexp_runtime::block_list::{BlockList, BlockListError};
use lexp_runtime::data::SplitMix64;
use lexp_runtime::sparse_ops::{self, SparseOpError, GROUP_ROWS};
use lexp_runtime::{CudaDevice, DeviceTensor};

fn gpu() -> Option<CudaDevice> {
    if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
        return None;
    }
    Some(CudaDevice::new(0).expect("LEXP_GPU_TESTS=1 but no usable GPU"))
}

/// Uniform in [-1, 1], rounded to `dtype`.
fn random(rng: &mut SplitMix64, dtype: Storage, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            lexp_compiler::dtype::round_to(dtype.dtype(), 2.0 * u - 1.0)
        })
        .collect()
}

/// A ragged list: group `g` keeps `(g * 3 + 2) % (max + 1)` blocks, except group 1 (none)
/// and group 0 (all `max`), distinct ids in a scrambled order, -1 padding.
fn ragged(groups: usize, nb: usize, max: usize, rng: &mut SplitMix64) -> (Vec<i32>, Vec<i32>) {
    let mut counts = vec![];
    let mut idx = vec![-1i32; groups * max];
    for g in 0..groups {
        let c = match g {
            0 => max,
            1 => 0,
            _ => (g * 3 + 2) % (max + 1),
        };
        let mut ids: Vec<i32> = (0..nb as i32).collect();
        for i in 0..c {
            let j = i + rng.below((nb - i) as u64) as usize;
            ids.swap(i, j);
        }
        idx[g * max..g * max + c].copy_from_slice(&ids[..c]);
        counts.push(c as i32);
    }
    (counts, idx)
}

fn upload(dev: &CudaDevice, dtype: Storage, dims: &[usize], v: &[f32]) -> DeviceTensor {
    DeviceTensor::from_f32(dev, dtype, dims, v).unwrap()
}

#[test]
fn chained_sparse_mlp_is_the_masked_dense_mlp() {
    let Some(dev) = gpu() else { return };
    // 600 tokens: 5 groups, the last one ragged (88 rows); hidden 264 (not a tile multiple).
    let (m, hd) = (600usize, 264usize);
    let groups = m.div_ceil(GROUP_ROWS);
    for dtype in [Storage::BF16, Storage::F16] {
        for (bs, nb, max) in [(64usize, 12usize, 7usize), (128, 6, 4)] {
            let f = nb * bs;
            let width = max * bs;
            let mut rng = SplitMix64::new(bs as u64 * 31 + dtype.bytes() as u64);
            let (counts, idx) = ragged(groups, nb, max, &mut rng);
            let list = Blocks {
                counts: &counts,
                indices: &idx,
                max_blocks: max,
                bm: GROUP_ROWS,
                bs,
            };
            let bl = BlockList::from_host(&dev, &counts, &idx, max, nb).unwrap();
            let (x, w1, b1) = (
                random(&mut rng, dtype, m * hd),
                random(&mut rng, dtype, f * hd),
                random(&mut rng, dtype, f),
            );
            let (w2, b2, dy) = (
                random(&mut rng, dtype, hd * f),
                random(&mut rng, dtype, hd),
                random(&mut rng, dtype, m * hd),
            );
            let tx = upload(&dev, dtype, &[m, hd], &x);
            let tw1 = upload(&dev, dtype, &[f, hd], &w1);
            let tb1 = upload(&dev, dtype, &[f], &b1);
            let tw2 = upload(&dev, dtype, &[hd, f], &w2);
            let tb2 = upload(&dev, dtype, &[hd], &b2);
            let tdy = upload(&dev, dtype, &[m, hd], &dy);
            // Every output poisoned: a slot a kernel reads without a producer writing it
            // would turn into NaN downstream.
            let th = DeviceTensor::poisoned(&dev, dtype, &[m, width]).unwrap();
            let ty = DeviceTensor::poisoned(&dev, dtype, &[m, hd]).unwrap();
            let tdh = DeviceTensor::poisoned(&dev, dtype, &[m, width]).unwrap();
            let tdx = DeviceTensor::poisoned(&dev, dtype, &[m, hd]).unwrap();
            let (h_, y_, dh_, dx_) = (th.as_arg(), ty.as_arg(), tdh.as_arg(), tdx.as_arg());
            sparse_ops::sparse_fc1_fwd(
                &dev,
                &tx.as_arg(),
                &tw1.as_arg(),
                &tb1.as_arg(),
                &bl,
                &h_,
                bs,
                &[],
            )
            .unwrap();
            sparse_ops::sparse_red(&dev, &h_, &tw2.as_arg(), &bl, &y_, bs, &[]).unwrap();
            k::bias_add::launch(
                &dev,
                &k::bias_add::Args {
                    x: &y_,
                    bias: &tb2.as_arg(),
                },
            )
            .unwrap();
            sparse_ops::sparse_fc2_dh(&dev, &tdy.as_arg(), &tw2.as_arg(), &h_, &bl, &dh_, bs, &[])
                .unwrap();
            sparse_ops::sparse_fc1_dx(&dev, &dh_, &tw1.as_arg(), &bl, &dx_, bs, &[]).unwrap();
            dev.synchronize().unwrap();
            let (h, y) = (th.to_f32_vec().unwrap(), ty.to_f32_vec().unwrap());
            let (dh, dx) = (tdh.to_f32_vec().unwrap(), tdx.to_f32_vec().unwrap());
            // Slots past each count were never written (still poison, i.e. NaN).
            for r in 0..m {
                let c = counts[r / GROUP_ROWS] as usize;
                for s in c * bs..width {
                    assert!(
                        h[r * width + s].is_nan(),
                        "h[{r}, {s}] written past count {c}"
                    );
                    assert!(
                        dh[r * width + s].is_nan(),
                        "dh[{r}, {s}] written past count {c}"
                    );
                }
            }
            let h_dense = rs::scatter(&h, (m, f), list);
            // The backward is exact given the forward the GPU made: a pre-activation within
            // rounding of 0 that came out 0 there is dropped from the reference mask too.
            let keep: Vec<bool> = list
                .dense_mask(m, f)
                .into_iter()
                .zip(&h_dense)
                .map(|(k, &v)| k && v > 0.0)
                .collect();
            let want = rs::masked_mlp(&x, &w1, &b1, &w2, &b2, &dy, &keep, (m, hd, f));
            let tol = tolerance(dtype);
            let what = format!("{} bs {bs}", dtype.name());
            for (name, got, want) in [
                ("h", &h_dense, &want.h),
                ("y", &y, &want.y),
                ("dh", &rs::scatter(&dh, (m, f), list), &want.dh),
                ("dx", &dx, &want.dx),
            ] {
                let d = compare(got, want);
                println!("{what} {name}: {d}");
                assert!(d.within(tol), "{what} {name}: {d} (tolerance {tol:e})");
            }
            // The masks did something: some kept activations clipped to 0, some positive,
            // and group 1 (nothing kept) has y = b2 and dx = 0.
            assert!(h_dense
                .iter()
                .zip(list.dense_mask(m, f))
                .any(|(v, k)| k && *v == 0.0));
            assert!(h_dense.iter().any(|v| *v > 0.0));
            for r in GROUP_ROWS..2 * GROUP_ROWS {
                assert_eq!(&y[r * hd..(r + 1) * hd], &b2[..], "row {r}");
                assert!(
                    dx[r * hd..(r + 1) * hd].iter().all(|v| *v == 0.0),
                    "row {r}"
                );
            }
        }
    }
}

#[test]
fn bad_block_lists_are_refused_before_launch() {
    let Some(dev) = gpu() else { return };
    let dtype = Storage::BF16;
    // 2 groups of 128 tokens, hidden 64, a weight of 4 blocks of 64.
    let (m, hd, bs, nb) = (256usize, 64usize, 64usize, 4usize);
    let f = nb * bs;
    let x = DeviceTensor::from_f32(&dev, dtype, &[m, hd], &vec![0.5; m * hd]).unwrap();
    let w1 = DeviceTensor::from_f32(&dev, dtype, &[f, hd], &vec![0.25; f * hd]).unwrap();
    let b1 = DeviceTensor::from_f32(&dev, dtype, &[f], &vec![0.125; f]).unwrap();
    let w2 = DeviceTensor::from_f32(&dev, dtype, &[hd, f], &vec![0.25; hd * f]).unwrap();
    let dy = DeviceTensor::from_f32(&dev, dtype, &[m, hd], &vec![1.0; m * hd]).unwrap();
    // Refused when built: out-of-range id, count above the bound.
    let err = BlockList::from_host(&dev, &[1, 1], &[0, 4], 1, nb).expect_err("block 4 of 4");
    assert!(
        matches!(err, BlockListError::IndexOutOfRange { .. }),
        "{err}"
    );
    let err = BlockList::from_host(&dev, &[2, 1], &[0, 1], 1, nb).expect_err("count 2 > 1");
    assert!(
        matches!(err, BlockListError::CountAboveBound { .. }),
        "{err}"
    );
    // Valid lists that do not fit the launch: built for 8 blocks, for 1 group, and a
    // compact activation of the wrong width. Each op refuses; the outputs keep their poison.
    let wrong_blocks = BlockList::from_host(&dev, &[1, 1], &[5, 6], 1, 8).unwrap();
    let wrong_groups = BlockList::from_host(&dev, &[1], &[2], 1, nb).unwrap();
    let good = BlockList::from_host(&dev, &[1, 1], &[2, 3], 1, nb).unwrap();
    let h = DeviceTensor::poisoned(&dev, dtype, &[m, bs]).unwrap();
    let dh = DeviceTensor::poisoned(&dev, dtype, &[m, bs]).unwrap();
    let dx = DeviceTensor::poisoned(&dev, dtype, &[m, hd]).unwrap();
    let wide = DeviceTensor::poisoned(&dev, dtype, &[m, 2 * bs]).unwrap();
    let (xa, w1a, b1a, w2a, dya) = (
        x.as_arg(),
        w1.as_arg(),
        b1.as_arg(),
        w2.as_arg(),
        dy.as_arg(),
    );
    let (ha, dha, dxa, widea) = (h.as_arg(), dh.as_arg(), dx.as_arg(), wide.as_arg());
    type Op<'a> = Box<
        dyn Fn(&BlockList, &lexp_compiler::launch::TensorArg) -> Result<(), SparseOpError> + 'a,
    >;
    let ops: [(&str, Op); 3] = [
        (
            "fc1_fwd",
            Box::new(|l, out| sparse_ops::sparse_fc1_fwd(&dev, &xa, &w1a, &b1a, l, out, bs, &[])),
        ),
        (
            "fc2_dh",
            Box::new(|l, out| sparse_ops::sparse_fc2_dh(&dev, &dya, &w2a, &ha, l, out, bs, &[])),
        ),
        (
            "fc1_dx",
            Box::new(|l, _| sparse_ops::sparse_fc1_dx(&dev, &ha, &w1a, l, &dxa, bs, &[])),
        ),
    ];
    let out_of = |name: &str| if name == "fc2_dh" { &dha } else { &ha };
    for (name, op) in &ops {
        let out = out_of(name);
        let e = op(&wrong_blocks, out).expect_err("8-block list, 4-block weight");
        assert!(
            matches!(
                e,
                SparseOpError::List(BlockListError::NumBlocksMismatch { .. })
            ),
            "{name}: {e}"
        );
        let e = op(&wrong_groups, out).expect_err("1-group list, 2 groups of tokens");
        assert!(
            matches!(
                e,
                SparseOpError::List(BlockListError::GroupsMismatch { .. })
            ),
            "{name}: {e}"
        );
        if *name != "fc1_dx" {
            let e = op(&good, &widea).expect_err("compact output twice too wide");
            assert!(matches!(e, SparseOpError::Shape { .. }), "{name}: {e}");
        }
        // A block size that does not divide the weight.
        let e = match *name {
            "fc1_fwd" => sparse_ops::sparse_fc1_fwd(&dev, &xa, &w1a, &b1a, &good, &ha, 96, &[]),
            "fc2_dh" => sparse_ops::sparse_fc2_dh(&dev, &dya, &w2a, &ha, &good, &dha, 96, &[]),
            _ => sparse_ops::sparse_fc1_dx(&dev, &ha, &w1a, &good, &dxa, 96, &[]),
        }
        .expect_err("block size 96 does not divide 256");
        assert!(matches!(e, SparseOpError::Shape { .. }), "{name}: {e}");
    }
    dev.synchronize().unwrap();
    for (name, t) in [("h", &h), ("dh", &dh), ("dx", &dx), ("wide", &wide)] {
        assert!(
            t.to_f32_vec().unwrap().iter().all(|v| v.is_nan()),
            "{name}: something was written"
        );
    }
    // The good list runs: h = relu(0.5 * 0.25 * 64 + 0.125) = 8.125 everywhere; then
    // dh = 1 * 0.25 * 64 = 16 (h > 0), dx = 16 * 0.25 * 64 = 256.
    sparse_ops::sparse_fc1_fwd(&dev, &xa, &w1a, &b1a, &good, &ha, bs, &[]).unwrap();
    sparse_ops::sparse_fc2_dh(&dev, &dya, &w2a, &ha, &good, &dha, bs, &[]).unwrap();
    sparse_ops::sparse_fc1_dx(&dev, &dha, &w1a, &good, &dxa, bs, &[]).unwrap();
    dev.synchronize().unwrap();
    assert!(h.to_f32_vec().unwrap().iter().all(|v| *v == 8.125));
    assert!(dh.to_f32_vec().unwrap().iter().all(|v| *v == 16.0));
    assert!(dx.to_f32_vec().unwrap().iter().all(|v| *v == 256.0));
}
