//! The block-sparse flash-attention kernels on the GPU (through the runtime's
//! `gpu::sparse_attention` plans and launches) against the masked f64 CPU references
//! (`lexp_kernels::reference::{attention_fwd_masked, attention_bwd_masked}`): packed batches of
//! uneven sequences, random q, k, v and dO (never zeros), random kept blocks (diagonal and sink
//! always), every output poisoned (NaN) before the kernels run; and at full density against
//! the dense references. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.

use lexp_compiler::dtype::Storage;
use lexp_kernels::reference::{self, compare, tolerance, AttnShape};
use lexp_runtime::gpu::flash_problem::FlashProblem;
use lexp_runtime::gpu::sparse_attention::{self as sa, SparseLists, SparsePlan};
use lexp_runtime::model::AttentionMask;
use lexp_runtime::CudaDevice;

fn enabled() -> bool {
    if std::env::var("LEXP_GPU_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
    false
}

/// Forward and backward on `lens` with `nh` heads of `hd` in `dtype` at `density` (1.0: the
/// dense mask, checked against the dense references).
fn case(
    dev: &CudaDevice,
    dtype: Storage,
    lens: &[usize],
    (nh, hd): (usize, usize),
    density: f64,
    seed: u64,
) {
    let h = nh * hd;
    let mut cu = vec![0usize];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let cu_i: Vec<i32> = cu.iter().map(|&c| c as i32).collect();
    let t = *cu.last().unwrap();
    let tp = t.div_ceil(4) * 4;
    let mut b = FlashProblem::new(dev, dtype, t, (nh, hd), seed).unwrap();
    let (qkv_h, d_o_h) = (b.qkv.to_f32_vec().unwrap(), b.d_o.to_f32_vec().unwrap());
    let mask = if density >= 1.0 {
        AttentionMask::dense(&cu_i, nh, 128, 128)
    } else {
        sa::synthetic_mask(&cu_i, nh, density, seed)
    };
    let sh = AttnShape {
        cu_seqlens: &cu,
        nh,
        hd,
        scale: f64::from(b.scale),
    };
    let (want_o, want_l, want) = if density >= 1.0 {
        let (o, l) = reference::attention_fwd(&qkv_h, sh);
        (o, l, reference::attention_bwd(&qkv_h, &d_o_h, sh))
    } else {
        let keep = |s: usize, head: usize, i: usize, j: usize| mask.visible(s, head, i, j);
        let (o, l) = reference::attention_fwd_masked(&qkv_h, sh, &keep);
        (
            o,
            l,
            reference::attention_bwd_masked(&qkv_h, &d_o_h, sh, &keep),
        )
    };
    let cfg = sa::sparse_config(hd).expect("block-sparse kernels for this head dimension");
    let plan = SparsePlan::of(&mask, &cu_i, nh, cfg).unwrap();
    let lists = SparseLists::upload(dev, &plan).unwrap();
    b.poison_outputs().unwrap();
    let a = b.attn_args();
    sa::forward(dev, cfg, &lists, &a).unwrap();
    sa::backward(dev, cfg, &lists, &a).unwrap();
    dev.synchronize().unwrap();
    let what = format!(
        "{dtype:?} lens {lens:?} x {nh} heads of {hd}, density {:.3}",
        mask.density()
    );
    let tol = tolerance(dtype);
    let check = |name: &str, got: &[f32], want: &[f32], tol: f64| {
        let d = compare(got, want);
        println!("{what}: {name} {d}");
        let close = if want.iter().all(|&w| w == 0.0) {
            d.max_abs <= 1e-6
        } else {
            d.rel_l2 <= tol
        };
        assert!(
            d.unwritten == 0 && d.non_finite == 0 && close,
            "{what}: {name} {d} (tolerance {tol:.0e})"
        );
    };
    check("o", &b.o.to_f32_vec().unwrap(), &want_o, tol);
    let got_l: Vec<f32> = b
        .lse2
        .to_f32_vec()
        .unwrap()
        .chunks(tp)
        .flat_map(|r| r[..t].to_vec())
        .collect();
    check("lse2", &got_l, &want_l, 1e-5);
    let got = b.dqkv.to_f32_vec().unwrap();
    for (blk, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let pick = |x: &[f32]| -> Vec<f32> {
            (0..t)
                .flat_map(|r| x[r * 3 * h + blk * h..r * 3 * h + (blk + 1) * h].to_vec())
                .collect()
        };
        check(name, &pick(&got), &pick(&want), 2.0 * tol);
    }
    if density < 1.0 {
        // The mask really drops work: the dense output differs.
        let (dense_o, _) = reference::attention_fwd(&qkv_h, sh);
        assert!(
            compare(&dense_o, &want_o).rel_l2 > 0.05,
            "{what}: the mask drops too little to test anything"
        );
    }
}

#[test]
fn block_sparse_attention_matches_the_reference_on_the_gpu() {
    if !enabled() {
        return;
    }
    let dev = CudaDevice::new(0).expect("a CUDA GPU");
    for dtype in [Storage::BF16, Storage::F16] {
        for hd in [64, 128] {
            case(&dev, dtype, &[700, 1, 129, 300], (3, hd), 0.3, 1);
            case(&dev, dtype, &[700, 1, 129, 300], (3, hd), 1.0, 2);
        }
    }
    // Longer sequences, sparser (fewer heads: the f64 reference is quadratic and serial).
    case(&dev, Storage::BF16, &[1024, 1024], (8, 64), 0.25, 3);
    case(&dev, Storage::BF16, &[2048], (8, 64), 0.1, 4);
    case(&dev, Storage::BF16, &[1500, 548], (4, 128), 0.25, 5);
}
