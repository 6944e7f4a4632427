//! The flash-attention kernels on the GPU against the f64 CPU references
//! (`lexp_kernels::reference::{attention_fwd, attention_bwd}`), on packed batches of uneven
//! sequences with random q, k, v and dO (never zeros), every output poisoned (NaN) before its
//! kernel runs. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.
//!
//! Shapes: lengths on and off the 64/128 block edges, a one-token sequence, head dimensions 64,
//! 80 (the split kernels) and 128 (every compiled tile configuration of each), the OPT-1.3B
//! attention shape (32 heads of 64) at 4 x 512 and 4 x 1024 tokens, OPT-2.7B's (32 heads of 80)
//! and OPT-6.7B's (32 heads of 128), in bf16 and f16.

use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::KernelInfo;
use lexp_kernels::flash_attention::{
    flash_bwd_dkdv, flash_bwd_dq, flash_fwd, key_blocks, query_blocks, BlockRow,
};
use lexp_kernels::flash_fused::flash_bwd_fused;
use lexp_kernels::flash_split::{flash_bwd_dkdv_split, flash_bwd_dq_split, flash_fwd_split};
use lexp_kernels::reference::{self, compare, tolerance, AttnShape};
use lexp_runtime::gpu::flash_launch::FlashFamily;
use lexp_runtime::gpu::flash_problem::{block_tensor, FlashProblem};
use lexp_runtime::{CudaDevice, DeviceTensor};

fn enabled() -> bool {
    if std::env::var("LEXP_GPU_TESTS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
    false
}

fn blocks(dev: &CudaDevice, rows: &[BlockRow]) -> DeviceTensor {
    block_tensor(dev, rows).unwrap()
}

type Config = Vec<(&'static str, usize)>;

/// The tile configurations of the forward, dk/dv and dq kernels that take `b`'s heads.
fn configs_for(b: &FlashProblem) -> [Vec<Config>; 3] {
    match b.family {
        FlashFamily::Tile => [
            configs(&flash_fwd::INFO, b.width),
            configs(&flash_bwd_dkdv::INFO, b.width),
            configs(&flash_bwd_dq::INFO, b.width),
        ],
        FlashFamily::Split => [
            flash_fwd_split::INFO.configurations(),
            flash_bwd_dkdv_split::INFO.configurations(),
            flash_bwd_dq_split::INFO.configurations(),
        ],
    }
}

/// The tile configurations of a kernel compiled for head dimension `hd`.
fn configs(info: &KernelInfo, hd: usize) -> Vec<Config> {
    let c: Vec<_> = info
        .configurations()
        .into_iter()
        .filter(|c| get(c, "D") == hd)
        .collect();
    assert!(
        !c.is_empty(),
        "{} has no variant for head dimension {hd}",
        info.name
    );
    c
}

/// Runs forward and backward on `lens` with `nh` heads of `hd` in `dtype`, with every tile
/// configuration of each kernel for that head dimension (the i-th ones together), and checks
/// every output against the reference.
fn case(dev: &CudaDevice, dtype: Storage, lens: &[usize], (nh, hd): (usize, usize), seed: u64) {
    let h = nh * hd;
    let mut cu = vec![0usize];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let t = *cu.last().unwrap();
    let tp = t.div_ceil(4) * 4;
    let mut b = FlashProblem::new(dev, dtype, t, (nh, hd), seed).unwrap();
    let (qkv_h, d_o_h) = (b.qkv.to_f32_vec().unwrap(), b.d_o.to_f32_vec().unwrap());
    let sh = AttnShape {
        cu_seqlens: &cu,
        nh,
        hd,
        scale: f64::from(b.scale),
    };
    let (want_o, want_l) = reference::attention_fwd(&qkv_h, sh);
    // The backward's reference starts from the same inputs (the kernels' only rounding on
    // the way is the stored o and the bf16/f16 P and dS of the tensor-core products).
    let want = reference::attention_bwd(&qkv_h, &d_o_h, sh);
    let tol = tolerance(dtype);
    let [fwd_c, dkdv_c, dq_c] = configs_for(&b);
    let n = fwd_c.len().max(dkdv_c.len()).max(dq_c.len());
    // LEXP_FLASH_ONLY_FUSED=1: only the last round (whose statistics the fused backward reads).
    let first = if std::env::var("LEXP_FLASH_ONLY_FUSED").as_deref() == Ok("1") {
        n - 1
    } else {
        0
    };
    for i in first..n {
        let (fc, kc, qc) = (
            &fwd_c[i % fwd_c.len()],
            &dkdv_c[i % dkdv_c.len()],
            &dq_c[i % dq_c.len()],
        );
        b.poison_outputs().unwrap();
        b.fwd(
            dev,
            fc,
            &blocks(dev, &query_blocks(&cu, get(fc, "BM")).unwrap()),
        )
        .unwrap();
        b.delta(dev).unwrap();
        b.dkdv(
            dev,
            kc,
            &blocks(dev, &key_blocks(&cu, get(kc, "BN")).unwrap()),
        )
        .unwrap();
        b.dq(
            dev,
            qc,
            &blocks(dev, &query_blocks(&cu, get(qc, "BM")).unwrap()),
        )
        .unwrap();
        dev.synchronize().unwrap();
        let what = format!(
            "{dtype:?} lens {lens:?} x {nh} heads of {hd}: fwd {fc:?} dkdv {kc:?} dq {qc:?}"
        );
        // An output whose reference is zero (dq of a one-token sequence: dP − delta vanishes
        // in exact arithmetic) is held to an absolute bound instead of the relative one.
        let check = |name: &str, got: &[f32], want: &[f32], tol: f64| {
            let d = compare(got, want);
            println!("{what}: {name} {d}");
            let zero_ref = want.iter().all(|&w| w == 0.0);
            let close = if zero_ref {
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
        // The fused backward in each of its configurations, from this forward's statistics:
        // delta, dk, dv and dq again, with `dqkv` and the dq accumulator poisoned first.
        let fused_c = match b.family {
            FlashFamily::Tile => configs(&flash_bwd_fused::INFO, b.width),
            FlashFamily::Split => vec![],
        };
        if i + 1 < n {
            continue;
        }
        for c in &fused_c {
            b.dqkv.poison().unwrap();
            b.dq_acc.poison().unwrap();
            b.delta.poison().unwrap();
            let kb = blocks(dev, &key_blocks(&cu, get(c, "BN")).unwrap());
            b.fused(dev, c, &kb).unwrap();
            dev.synchronize().unwrap();
            let got = b.dqkv.to_f32_vec().unwrap();
            for (blk, name) in ["dq", "dk", "dv"].iter().enumerate() {
                let pick = |x: &[f32]| -> Vec<f32> {
                    (0..t)
                        .flat_map(|r| x[r * 3 * h + blk * h..r * 3 * h + (blk + 1) * h].to_vec())
                        .collect()
                };
                check(
                    &format!("fused {c:?} {name}"),
                    &pick(&got),
                    &pick(&want),
                    2.0 * tol,
                );
            }
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
        for hd in [64, 128] {
            case(&dev, dtype, &[130, 1, 65, 64, 128, 257], (3, hd), 1);
            case(&dev, dtype, &[1], (1, hd), 2);
        }
    }
    case(&dev, Storage::BF16, &[512, 512, 512, 512], (32, 64), 3);
    case(&dev, Storage::BF16, &[1024, 1000, 24, 1024], (32, 64), 4);
    // OPT-6.7B's attention shape: 32 heads of 128.
    case(&dev, Storage::BF16, &[1024, 300, 700], (32, 128), 5);
}

/// OPT-2.7B's heads of 80, on the kernels the engine runs for them, in place (no padded
/// copies): a store past a head's 80 columns would land in the next head's and fail its
/// comparison. A test of its own so that it can be run alone (the one above takes minutes
/// of f64 reference on the host).
#[test]
fn flash_attention_heads_of_80_match_the_reference_on_the_gpu() {
    if !enabled() {
        return;
    }
    let dev = CudaDevice::new(0).expect("a CUDA GPU");
    for dtype in [Storage::BF16, Storage::F16] {
        case(&dev, dtype, &[130, 1, 65, 64, 128, 257], (3, 80), 6);
    }
    case(&dev, Storage::BF16, &[1024, 300, 700], (32, 80), 7);
}

/// Every compiled tile configuration of the four kernels at the OPT-1.3B attention shape
/// (32 heads of 64) and OPT-2.7B's (32 heads of 80, the split kernels), 4 sequences of 512 and
/// of 1024 tokens, heads of 128 at 4 x 1024 and 1 x 4096, and one sequence of 16384 tokens at
/// 64 and 128, bf16, timed (median of 20 after 3 warm-up launches): which one the engine should
/// run, and what each achieves in TFLOP/s of the causal half of the heads' own work
/// (correctness is the tests above). Fails when a configuration falls below `MIN_TFLOPS` from 4096 tokens on, a
/// floor far under what they reach on the H200 (109–192 TFLOP/s at 64,
/// `bench/results/2026-11-29-h200-flash-attention.txt`): it catches a kernel that lost its
/// tensor-core path or its pipelining, not small drifts.
#[test]
fn flash_attention_configurations_timed_at_opt_sizes() {
    const MIN_TFLOPS: f64 = 40.0;
    if !enabled() {
        return;
    }
    use lexp_runtime::time_ms;
    let dev = CudaDevice::new(0).expect("a CUDA GPU");
    // (heads, head dim, sequences, length): OPT-1.3B's and OPT-2.7B's steps, heads of 128,
    // one sequence of 4096 and 8192 (the dense-step issue's long rows) and of 16384 (issue 7's
    // 16k) at 64, and long sequences at 128.
    let cases = [
        (32usize, 64usize, 4usize, 512usize),
        (32, 64, 4, 1024),
        (32, 80, 4, 512),
        (32, 80, 4, 1024),
        (16, 128, 4, 1024),
        (16, 128, 1, 4096),
        (32, 64, 1, 4096),
        (32, 64, 1, 8192),
        (32, 64, 1, 16384),
        (16, 128, 1, 16384),
    ];
    // LEXP_FLASH_TIMED_TOKENS (e.g. 4096,16384) times only the cases of those token counts.
    let only: Option<Vec<usize>> = std::env::var("LEXP_FLASH_TIMED_TOKENS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect());
    for (nh, hd, seqs, len) in cases {
        if only.as_ref().is_some_and(|o| !o.contains(&(seqs * len))) {
            continue;
        }
        let cu: Vec<usize> = (0..=seqs).map(|i| i * len).collect();
        let b = FlashProblem::new(&dev, Storage::BF16, seqs * len, (nh, hd), 5).unwrap();
        // Query-key pairs of the causal half, all heads.
        let pairs = (seqs * len * (len + 1) / 2 * nh) as f64;
        let tag = format!("{nh}x{hd} {seqs}x{len}");
        let report = |name: &str, consts: &[(&str, usize)], gemms: f64, ms: f64| {
            let tflops = gemms * 2.0 * hd as f64 * pairs / (ms * 1e-3) / 1e12;
            println!("{tag} {name} {consts:?}: {ms:.3} ms, {tflops:.0} TFLOP/s");
            assert!(
                len * seqs < 4096 || tflops >= MIN_TFLOPS,
                "{tag} {name} {consts:?}: {tflops:.0} TFLOP/s, below {MIN_TFLOPS}"
            );
        };
        let time =
            |f: &dyn Fn() -> lexp_runtime::Result<()>| time_ms(&dev, 3, 20, f).unwrap().median();
        let [fwd_c, dkdv_c, dq_c] = configs_for(&b);
        for c in fwd_c {
            let qb = blocks(&dev, &query_blocks(&cu, get(&c, "BM")).unwrap());
            report("fwd", &c, 2.0, time(&|| b.fwd(&dev, &c, &qb)));
        }
        println!("{tag} delta: {:.3} ms", time(&|| b.delta(&dev)));
        for c in dkdv_c {
            let kb = blocks(&dev, &key_blocks(&cu, get(&c, "BN")).unwrap());
            report("dkdv", &c, 4.0, time(&|| b.dkdv(&dev, &c, &kb)));
        }
        for c in dq_c {
            let qb = blocks(&dev, &query_blocks(&cu, get(&c, "BM")).unwrap());
            report("dq", &c, 3.0, time(&|| b.dq(&dev, &c, &qb)));
        }
        if b.family == FlashFamily::Tile {
            // The fused backward whole (delta and the accumulator cleared, dk/dv/dq, dq
            // converted): five products where delta + dk/dv + dq run seven.
            for c in configs(&flash_bwd_fused::INFO, b.width) {
                let kb = blocks(&dev, &key_blocks(&cu, get(&c, "BN")).unwrap());
                report("fused bwd", &c, 5.0, time(&|| b.fused(&dev, &c, &kb)));
            }
        }
    }
}
