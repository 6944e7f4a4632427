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

    let mut o = DeviceTensor::poisoned(dev, dtype, &[t, h]).unwrap();
    // Rows padded to 16 bytes, as the kernels require (the engine does the same).
    let tp = t.div_ceil(4) * 4;
    let mut lse2 = DeviceTensor::poisoned(dev, Storage::F32, &[nh, tp]).unwrap();
    let mut delta = DeviceTensor::poisoned(dev, Storage::F32, &[nh, tp]).unwrap();
    let mut dqkv = DeviceTensor::poisoned(dev, dtype, &[t, 3 * h]).unwrap();
    let (want_o, want_l) = reference::attention_fwd(&qkv_h, sh);
    // The backward's reference starts from the same inputs (the kernels' only rounding on
    // the way is the stored o and the bf16/f16 P and dS of the tensor-core products).
    let want = reference::attention_bwd(&qkv_h, &d_o_h, sh);
    let tol = tolerance(dtype);
    let (fwd_c, dkdv_c, dq_c) = (
        flash_fwd::INFO.configurations(),
        flash_bwd_dkdv::INFO.configurations(),
        flash_bwd_dq::INFO.configurations(),
    );
    // Every configuration of each kernel, the i-th ones together.
    for i in 0..fwd_c.len().max(dkdv_c.len()).max(dq_c.len()) {
        let (fc, kc, qc) = (
            &fwd_c[i % fwd_c.len()],
            &dkdv_c[i % dkdv_c.len()],
            &dq_c[i % dq_c.len()],
        );
        for x in [&mut o, &mut lse2, &mut delta, &mut dqkv] {
            x.poison().unwrap();
        }
        let qb = blocks(dev, &query_blocks(&cu, get(fc, "BM")).unwrap());
        let kb = blocks(dev, &key_blocks(&cu, get(kc, "BN")).unwrap());
        let qbd = blocks(dev, &query_blocks(&cu, get(qc, "BM")).unwrap());
        let a = |x: &DeviceTensor| -> TensorArg { x.as_arg() };
        flash_fwd::launch_with(
            dev,
            fc,
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
        flash_bwd_dkdv::launch_with(
            dev,
            kc,
            &flash_bwd_dkdv::Args {
                qkv: &a(&qkv),
                d_o: &a(&d_o),
                lse2: &a(&lse2),
                delta: &a(&delta),
                blocks: &a(&kb),
                scale_log2,
                scale: scale as f32,
                dqkv: &a(&dqkv),
            },
        )
        .unwrap();
        flash_bwd_dq::launch_with(
            dev,
            qc,
            &flash_bwd_dq::Args {
                qkv: &a(&qkv),
                d_o: &a(&d_o),
                lse2: &a(&lse2),
                delta: &a(&delta),
                blocks: &a(&qbd),
                scale_log2,
                scale: scale as f32,
                dqkv: &a(&dqkv),
            },
        )
        .unwrap();
        dev.synchronize().unwrap();
        let what = format!("{what} fwd {fc:?} dkdv {kc:?} dq {qc:?}");
        let check = |name: &str, got: &[f32], want: &[f32], tol: f64| {
            let d = compare(got, want);
            println!("{what}: {name} {d}");
            assert!(
                d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 <= tol,
                "{what}: {name} {d} (tolerance {tol:.0e})"
            );
        };
        check("o", &o.to_f32_vec().unwrap(), &want_o, tol);
        let got_l: Vec<f32> = lse2
            .to_f32_vec()
            .unwrap()
            .chunks(tp)
            .flat_map(|r| r[..t].to_vec())
            .collect();
        check("lse2", &got_l, &want_l, 1e-5);
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
}

/// The value of tile parameter `name` in a configuration.
fn get(consts: &[(&'static str, usize)], name: &str) -> usize {
    consts
        .iter()
        .find(|(n, _)| *n == name)
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("no {name} in {consts:?}"))
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

/// Every compiled tile configuration of the four kernels at the OPT-1.3B attention shape
/// (32 heads of 64, 4 sequences of 512 and of 1024 tokens, bf16), timed (median of 20 after
/// 3 warm-up launches) and checked against the configuration the engine uses: which one the
/// engine should run, and what each achieves in TFLOP/s of the causal half. Prints only.
#[test]
fn flash_attention_configurations_timed_at_opt_1_3b() {
    if !enabled() {
        return;
    }
    use lexp_runtime::time_ms;
    let dev = CudaDevice::new(0).expect("a CUDA GPU");
    let (nh, hd) = (32usize, 64usize);
    let h = nh * hd;
    for len in [512usize, 1024] {
        let cu: Vec<usize> = (0..=4).map(|i| i * len).collect();
        let t = 4 * len;
        let tp = t.div_ceil(4) * 4;
        let mut rng = SplitMix64::new(5);
        let qkv = DeviceTensor::from_f32(
            &dev,
            Storage::BF16,
            &[t, 3 * h],
            &uniform(&mut rng, t * 3 * h, 2.0),
        )
        .unwrap();
        let d_o =
            DeviceTensor::from_f32(&dev, Storage::BF16, &[t, h], &uniform(&mut rng, t * h, 1.0))
                .unwrap();
        let o = DeviceTensor::zeros(&dev, Storage::BF16, &[t, h]).unwrap();
        let lse2 = DeviceTensor::zeros(&dev, Storage::F32, &[nh, tp]).unwrap();
        let delta = DeviceTensor::zeros(&dev, Storage::F32, &[nh, tp]).unwrap();
        let dqkv = DeviceTensor::zeros(&dev, Storage::BF16, &[t, 3 * h]).unwrap();
        let scale = (hd as f32).powf(-0.5);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        // Query-key pairs of the causal half, all heads.
        let pairs = (4 * len * (len + 1) / 2 * nh) as f64;
        let tflops = |gemms: f64, ms: f64| gemms * 2.0 * hd as f64 * pairs / (ms * 1e-3) / 1e12;
        let a = |x: &DeviceTensor| x.as_arg();
        for consts in flash_fwd::INFO.configurations() {
            let qb = blocks(&dev, &query_blocks(&cu, get(&consts, "BM")).unwrap());
            let tm = time_ms(&dev, 3, 20, || {
                flash_fwd::launch_with(
                    &dev,
                    &consts,
                    &flash_fwd::Args {
                        qkv: &a(&qkv),
                        blocks: &a(&qb),
                        scale_log2,
                        o: &a(&o),
                        lse2: &a(&lse2),
                    },
                )
            })
            .unwrap();
            println!(
                "4x{len} flash_fwd {consts:?}: {:.3} ms, {:.0} TFLOP/s",
                tm.median(),
                tflops(2.0, tm.median())
            );
        }
        let tm = time_ms(&dev, 3, 20, || {
            flash_bwd_delta::launch(
                &dev,
                &flash_bwd_delta::Args {
                    o: &a(&o),
                    d_o: &a(&d_o),
                    delta: &a(&delta),
                },
            )
        })
        .unwrap();
        println!("4x{len} flash_bwd_delta: {:.3} ms", tm.median());
        for consts in flash_bwd_dkdv::INFO.configurations() {
            let kb = blocks(&dev, &key_blocks(&cu, get(&consts, "BN")).unwrap());
            let tm = time_ms(&dev, 3, 20, || {
                flash_bwd_dkdv::launch_with(
                    &dev,
                    &consts,
                    &flash_bwd_dkdv::Args {
                        qkv: &a(&qkv),
                        d_o: &a(&d_o),
                        lse2: &a(&lse2),
                        delta: &a(&delta),
                        blocks: &a(&kb),
                        scale_log2,
                        scale,
                        dqkv: &a(&dqkv),
                    },
                )
            })
            .unwrap();
            println!(
                "4x{len} flash_bwd_dkdv {consts:?}: {:.3} ms, {:.0} TFLOP/s",
                tm.median(),
                tflops(4.0, tm.median())
            );
        }
        for consts in flash_bwd_dq::INFO.configurations() {
            let qb = blocks(&dev, &query_blocks(&cu, get(&consts, "BM")).unwrap());
            let tm = time_ms(&dev, 3, 20, || {
                flash_bwd_dq::launch_with(
                    &dev,
                    &consts,
                    &flash_bwd_dq::Args {
                        qkv: &a(&qkv),
                        d_o: &a(&d_o),
                        lse2: &a(&lse2),
                        delta: &a(&delta),
                        blocks: &a(&qb),
                        scale_log2,
                        scale,
                        dqkv: &a(&dqkv),
                    },
                )
            })
            .unwrap();
            println!(
                "4x{len} flash_bwd_dq {consts:?}: {:.3} ms, {:.0} TFLOP/s",
                tm.median(),
                tflops(3.0, tm.median())
            );
        }
    }
}
