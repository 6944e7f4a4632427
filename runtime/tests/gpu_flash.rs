//! The flash-attention kernels on the GPU against the f64 CPU references
//! (`lexp_kernels::reference::{attention_fwd, attention_bwd}`), on packed batches of uneven
//! sequences with random q, k, v and dO (never zeros), every output poisoned (NaN) before its
//! kernel runs. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.
//!
//! Shapes: lengths on and off the 64/128 block edges, a one-token sequence, and the OPT-1.3B
//! attention shape (32 heads of 64) at 4 x 512 and 4 x 1024 tokens, in bf16 and f16.

use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::TensorArg;
use lexp_kernels::flash_attention::{
    flash_bwd_delta, flash_bwd_dkdv, flash_bwd_dq, flash_fwd, key_blocks, query_blocks, BlockRow,
};
use lexp_kernels::reference::{self, compare, tolerance, AttnShape};
use lexp_runtime::data::SplitMix64;
use lexp_runtime::{CudaDevice, DeviceTensor};

fn enabled() -> bool {
    if std::env::var("LEXP_GPU_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
    false
}

fn uniform(rng: &mut SplitMix64, n: usize, a: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a) as f32)
        .collect()
}

fn blocks(dev: &CudaDevice, rows: &[BlockRow]) -> DeviceTensor {
    let f: Vec<f32> = rows.iter().flatten().map(|x| *x as f32).collect();
    DeviceTensor::from_f32(dev, Storage::I32, &[rows.len(), 3], &f).unwrap()
}

/// Runs forward and backward on `lens` with `nh` heads of 64 in `dtype` and checks every
/// output against the reference.
fn case(dev: &CudaDevice, dtype: Storage, lens: &[usize], nh: usize, seed: u64) {
    let hd = 64;
    let h = nh * hd;
    let mut cu = vec![0usize];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let t = *cu.last().unwrap();
    let mut rng = SplitMix64::new(seed);
    let qkv = DeviceTensor::from_f32(dev, dtype, &[t, 3 * h], &uniform(&mut rng, t * 3 * h, 2.0))
        .unwrap();
    let d_o = DeviceTensor::from_f32(dev, dtype, &[t, h], &uniform(&mut rng, t * h, 1.0)).unwrap();
    let (qkv_h, d_o_h) = (qkv.to_f32_vec().unwrap(), d_o.to_f32_vec().unwrap());
    let scale = (hd as f64).powf(-0.5);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let sh = AttnShape {
        cu_seqlens: &cu,
        nh,
        hd,
        scale,
    };
    let what = format!("{dtype:?} lens {lens:?} x {nh} heads");

    let o = DeviceTensor::poisoned(dev, dtype, &[t, h]).unwrap();
    let lse2 = DeviceTensor::poisoned(dev, Storage::F32, &[nh, t]).unwrap();
    let delta = DeviceTensor::poisoned(dev, Storage::F32, &[nh, t]).unwrap();
    let dqkv = DeviceTensor::poisoned(dev, dtype, &[t, 3 * h]).unwrap();
    let qb = blocks(dev, &query_blocks(&cu, 128).unwrap());
    let qb64 = blocks(dev, &query_blocks(&cu, 64).unwrap());
    let kb = blocks(dev, &key_blocks(&cu, 64).unwrap());
    let a = |x: &DeviceTensor| -> TensorArg { x.as_arg() };
    flash_fwd::launch(
        dev,
        &flash_fwd::Args {
            qkv: &a(&qkv),
            blocks: &a(&qb),
            scale_log2,
            o: &a(&o),
            lse2: &a(&lse2),
        },
    )
    .unwrap();
    flash_bwd_delta::launch(
        dev,
        &flash_bwd_delta::Args {
            o: &a(&o),
            d_o: &a(&d_o),
            delta: &a(&delta),
        },
    )
    .unwrap();
    let bwd = |blk: &DeviceTensor, dkdv: bool| {
        if dkdv {
            flash_bwd_dkdv::launch(
                dev,
                &flash_bwd_dkdv::Args {
                    qkv: &a(&qkv),
                    d_o: &a(&d_o),
                    lse2: &a(&lse2),
                    delta: &a(&delta),
                    blocks: &a(blk),
                    scale_log2,
                    scale: scale as f32,
                    dqkv: &a(&dqkv),
                },
            )
        } else {
            flash_bwd_dq::launch(
                dev,
                &flash_bwd_dq::Args {
                    qkv: &a(&qkv),
                    d_o: &a(&d_o),
                    lse2: &a(&lse2),
                    delta: &a(&delta),
                    blocks: &a(blk),
                    scale_log2,
                    scale: scale as f32,
                    dqkv: &a(&dqkv),
                },
            )
        }
    };
    bwd(&kb, true).unwrap();
    bwd(&qb64, false).unwrap();
    dev.synchronize().unwrap();

    let (want_o, want_l) = reference::attention_fwd(&qkv_h, sh);
    let tol = tolerance(dtype);
    let check = |name: &str, got: &[f32], want: &[f32], tol: f64| {
        let d = compare(got, want);
        println!("{what}: {name} {d}");
        assert!(
            d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 <= tol,
            "{what}: {name} {d} (tolerance {tol:.0e})"
        );
    };
    check("o", &o.to_f32_vec().unwrap(), &want_o, tol);
    check("lse2", &lse2.to_f32_vec().unwrap(), &want_l, 1e-5);
    // The backward's reference starts from the same inputs (the kernels' only rounding on
    // the way is the stored o and the bf16/f16 P and dS of the tensor-core products).
    let want = reference::attention_bwd(&qkv_h, &d_o_h, sh);
    let got = dqkv.to_f32_vec().unwrap();
    for (b, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let pick = |x: &[f32]| -> Vec<f32> {
            (0..t)
                .flat_map(|r| x[r * 3 * h + b * h..r * 3 * h + (b + 1) * h].to_vec())
                .collect()
        };
        check(name, &pick(&got), &pick(&want), 2.0 * tol);
    }
}

#[test]
fn flash_attention_matches_the_reference_on_the_gpu() {
    if !enabled() {
        return;
    }
    let dev = CudaDevice::new(0).expect("a CUDA GPU");
    for dtype in [Storage::BF16, Storage::F16] {
        case(&dev, dtype, &[130, 1, 65, 64, 128, 257], 3, 1);
        case(&dev, dtype, &[1], 1, 2);
    }
    case(&dev, Storage::BF16, &[512, 512, 512, 512], 32, 3);
    case(&dev, Storage::BF16, &[1024, 1000, 24, 1024], 32, 4);
}
