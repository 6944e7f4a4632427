//! The flash-attention kernels in the interpreter (the GPU's numerics) against the f64 CPU
//! references `lexp_kernels::reference::{attention_fwd, attention_bwd}`, on packed batches of
//! uneven sequences (lengths on and off the block edges, a sequence of one token), outputs
//! poisoned before each run. Heads narrower than the kernels' tile (`hd < D`: OPT-2.7B's 80 on
//! the 128 kernels) run in place: a store of the tile's columns past `hd` would land in the next
//! head's and fail its comparison.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_kernels::flash_attention::{
    flash_bwd_delta, flash_bwd_dkdv, flash_bwd_dq, flash_fwd, key_blocks, query_blocks, BlockRow,
};
use lexp_kernels::flash_fused::{flash_bwd_dq_store, flash_bwd_fused, flash_bwd_prep};
use lexp_kernels::flash_split::{flash_bwd_dkdv_split, flash_bwd_dq_split, flash_fwd_split};
use lexp_kernels::reference::{self, compare, AttnShape, POISON};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn poisoned(dtype: Storage, dims: &[usize]) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![POISON; dims.iter().product()])
}

fn block_tensor(b: &[BlockRow]) -> HostTensor {
    let f: Vec<f32> = b.iter().flatten().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, &[b.len(), 3], &f)
}

fn random(rng: &mut StdRng, dtype: Storage, dims: &[usize]) -> HostTensor {
    let v: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    HostTensor::new(dtype, dims, &v)
}

/// Which flash kernels run a case.
#[derive(Clone, Copy, Debug)]
enum Kernels {
    /// `flash_attention`'s, of tile width `D` (`hd <= D`).
    Tile(usize),
    /// `flash_split`'s, for heads of 64 + 16 (`flash_bwd_delta` on the 128 tile).
    Split,
}

/// Forward and backward on sequences of `lens`, `nh` heads of `hd`, in `dtype`, on `kernels`.
fn case(seed: u64, dtype: Storage, lens: &[usize], nh: usize, hd: usize, kernels: Kernels) {
    let dk = match kernels {
        Kernels::Tile(d) => d,
        Kernels::Split => 128,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cu = vec![0usize];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let t = *cu.last().unwrap();
    let h = nh * hd;
    let mut qkv = random(&mut rng, dtype, &[t, 3 * nh, hd]);
    let scale = (hd as f64).powf(-0.5);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let sh = AttnShape {
        cu_seqlens: &cu,
        nh,
        hd,
        scale,
    };
    let what = format!("{dtype:?} lens {lens:?} heads {nh} of {hd} (kernels {kernels:?})");

    let (want_o, want_l) = reference::attention_fwd(&qkv.data, sh);
    let mut o = poisoned(dtype, &[t, nh, hd]);
    // The statistics' rows padded to 16 bytes, as the GPU engine lays them out.
    let tp = t.div_ceil(4) * 4;
    let mut lse2 = poisoned(Storage::F32, &[nh, tp]);
    let mut qb = block_tensor(&query_blocks(&cu, 128).unwrap());
    // The forward kernels of both families take the same arguments.
    macro_rules! fwd {
        ($kernel:ident, $consts:expr) => {
            fwd!($kernel, $consts, o, lse2)
        };
        ($kernel:ident, $consts:expr, $o:ident, $lse2:ident) => {
            $kernel::interpret(
                &$consts,
                $kernel::HostArgs {
                    qkv: &mut qkv,
                    blocks: &mut qb,
                    scale_log2,
                    o: &mut $o,
                    lse2: &mut $lse2,
                },
            )
            .unwrap()
        };
    }
    match kernels {
        Kernels::Tile(d) => fwd!(flash_fwd, [("D", d), ("BM", 128), ("BN", 64)]),
        Kernels::Split => fwd!(flash_fwd_split, [("BN", 64)]),
    }
    let d = compare(&o.data, &want_o);
    assert!(
        d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 1e-2,
        "{what}: o {d}"
    );
    if let Kernels::Tile(d) = kernels {
        // One-warpgroup programs: 64 queries each, over the 64-query block list (`fwd!` reads
        // `qb`).
        let mut o64 = poisoned(dtype, &[t, nh, hd]);
        let mut l64 = poisoned(Storage::F32, &[nh, tp]);
        qb = block_tensor(&query_blocks(&cu, 64).unwrap());
        fwd!(flash_fwd, [("D", d), ("BM", 64), ("BN", 64)], o64, l64);
        let d = compare(&o64.data, &want_o);
        assert!(
            d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 1e-2,
            "{what}: o (BM 64) {d}"
        );
    }
    let got_l: Vec<f32> = lse2.data.chunks(tp).flat_map(|r| r[..t].to_vec()).collect();
    let d = compare(&got_l, &want_l);
    assert!(
        d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 1e-5,
        "{what}: lse2 {d}"
    );

    let mut d_o = random(&mut rng, dtype, &[t, nh, hd]);
    let want = reference::attention_bwd(&qkv.data, &d_o.data, sh);
    let mut delta = poisoned(Storage::F32, &[nh, tp]);
    flash_bwd_delta::interpret(
        &[("D", dk)],
        flash_bwd_delta::HostArgs {
            o: &mut o,
            d_o: &mut d_o,
            delta: &mut delta,
        },
    )
    .unwrap();
    let mut dqkv = poisoned(dtype, &[t, 3 * nh, hd]);
    let mut kb = block_tensor(&key_blocks(&cu, 64).unwrap());
    let mut qb64 = block_tensor(&query_blocks(&cu, 64).unwrap());
    // dk/dv, then dq: the same arguments for every kernel family (into `dqkv` unless named).
    macro_rules! bwd {
        ($kernel:ident, $consts:expr, $blocks:expr) => {
            bwd!($kernel, $consts, $blocks, dqkv)
        };
        ($kernel:ident, $consts:expr, $blocks:expr, $dqkv:ident) => {
            $kernel::interpret(
                &$consts,
                $kernel::HostArgs {
                    qkv: &mut qkv,
                    d_o: &mut d_o,
                    lse2: &mut lse2,
                    delta: &mut delta,
                    blocks: &mut $blocks,
                    scale_log2,
                    scale: scale as f32,
                    dqkv: &mut $dqkv,
                },
            )
            .unwrap()
        };
    }
    match kernels {
        Kernels::Tile(d) => {
            bwd!(flash_bwd_dkdv, [("D", d), ("BN", 64)], kb);
            bwd!(flash_bwd_dq, [("D", d), ("BM", 64)], qb64);
        }
        Kernels::Split => {
            bwd!(flash_bwd_dkdv_split, [("BN", 64)], kb);
            bwd!(flash_bwd_dq_split, [("BM", 64)], qb64);
        }
    }
    let check = |dqkv: &HostTensor, names: &[(usize, &str)], tag: &str| {
        for &(b, name) in names {
            let pick = |x: &[f32]| -> Vec<f32> {
                (0..t)
                    .flat_map(|r| x[r * 3 * h + b * h..r * 3 * h + (b + 1) * h].to_vec())
                    .collect()
            };
            let d = compare(&pick(&dqkv.data), &pick(&want));
            println!("{what}{tag}: {name} {d}");
            assert!(
                d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 2e-2,
                "{what}{tag}: {name} {d}"
            );
        }
    };
    check(&dqkv, &[(0, "dq"), (1, "dk"), (2, "dv")], "");
    let Kernels::Tile(d) = kernels else {
        return;
    };
    // The fused backward: delta and the cleared dq accumulator, dk/dv with dq added, dq
    // scaled and converted, in each tile it has. The accumulator starts poisoned:
    // `flash_bwd_prep` must clear every row that is added to.
    let tiles: &[(usize, usize, usize)] = if d == 64 {
        &[(4, 64, 64), (8, 128, 64)]
    } else {
        &[(8, 64, 32)]
    };
    for &(w, bn, bm) in tiles {
        let mut delta2 = poisoned(Storage::F32, &[nh, tp]);
        let mut dq_acc = poisoned(Storage::F32, &[t, nh, hd]);
        flash_bwd_prep::interpret(
            &[("D", dk)],
            flash_bwd_prep::HostArgs {
                o: &mut o,
                d_o: &mut d_o,
                delta: &mut delta2,
                dq_acc: &mut dq_acc,
            },
        )
        .unwrap();
        assert_eq!(delta2.data, delta.data, "{what}: flash_bwd_prep's delta");
        let mut dqkv_f = poisoned(dtype, &[t, 3 * nh, hd]);
        let mut kb_f = block_tensor(&key_blocks(&cu, bn).unwrap());
        flash_bwd_fused::interpret(
            &[("D", d), ("W", w), ("BN", bn), ("BM", bm)],
            flash_bwd_fused::HostArgs {
                qkv: &mut qkv,
                d_o: &mut d_o,
                lse2: &mut lse2,
                delta: &mut delta2,
                blocks: &mut kb_f,
                scale_log2,
                scale: scale as f32,
                dqkv: &mut dqkv_f,
                dq_acc: &mut dq_acc,
            },
        )
        .unwrap();
        flash_bwd_dq_store::interpret(
            &[("D", dk)],
            flash_bwd_dq_store::HostArgs {
                dq_acc: &mut dq_acc,
                scale: scale as f32,
                dqkv: &mut dqkv_f,
            },
        )
        .unwrap();
        let tag = format!(" (fused, W {w} BN {bn} BM {bm})");
        check(&dqkv_f, &[(0, "dq"), (1, "dk"), (2, "dv")], &tag);
    }
    // dk/dv with 128-key blocks (8 warps of 16 whole key rows: P and dS feed the MMAs from
    // registers) in each query step the head dimension has, and dq with 128-query blocks.
    let steps: &[usize] = if d == 64 { &[64] } else { &[32] };
    let mut kb128 = block_tensor(&key_blocks(&cu, 128).unwrap());
    for &bm in steps {
        let mut dqkv128 = poisoned(dtype, &[t, 3 * nh, hd]);
        bwd!(
            flash_bwd_dkdv,
            [("D", dk), ("BN", 128), ("BM", bm)],
            kb128,
            dqkv128
        );
        let tag = format!(" (dk/dv BN 128, BM {bm})");
        check(&dqkv128, &[(1, "dk"), (2, "dv")], &tag);
    }
    // dq in 128-query programs with 64-key steps, and with 128-key steps (heads of 64 only).
    let mut qb128 = block_tensor(&query_blocks(&cu, 128).unwrap());
    let key_steps: &[usize] = if d == 64 { &[64, 128] } else { &[64] };
    for &bn in key_steps {
        let mut dqkv_q = poisoned(dtype, &[t, 3 * nh, hd]);
        bwd!(
            flash_bwd_dq,
            [("D", dk), ("BM", 128), ("BN", bn)],
            qb128,
            dqkv_q
        );
        check(&dqkv_q, &[(0, "dq")], &format!(" (dq BM 128, BN {bn})"));
    }
    // The forward with 128-key steps, in 128- and in 64-query programs (`fwd!` reads `qb`).
    for bm in [128, 64] {
        qb = block_tensor(&query_blocks(&cu, bm).unwrap());
        let mut o128 = poisoned(dtype, &[t, nh, hd]);
        let mut lse128 = poisoned(Storage::F32, &[nh, tp]);
        fwd!(flash_fwd, [("D", d), ("BM", bm), ("BN", 128)], o128, lse128);
        let dd = compare(&o128.data, &want_o);
        assert!(
            dd.unwritten == 0 && dd.non_finite == 0 && dd.rel_l2 < 1e-2,
            "{what}: o (BM {bm}, BN 128) {dd}"
        );
    }
}

#[test]
fn flash_attention_bf16_uneven_packed_batch() {
    case(7, Storage::BF16, &[130, 1, 65], 2, 64, Kernels::Tile(64));
}

#[test]
fn flash_attention_f16_block_edges() {
    case(8, Storage::F16, &[64, 128, 3], 1, 64, Kernels::Tile(64));
}

#[test]
fn flash_attention_head_dim_128_uneven_packed_batch() {
    case(9, Storage::BF16, &[70, 1, 129], 2, 128, Kernels::Tile(128));
}

/// OPT-2.7B's heads of 80 on the 128-wide kernels, in place: the loads zero-fill columns
/// 80..128 and the stores drop them (a store past a head's 80 columns would overwrite the next
/// head's, which the comparison of every head catches).
#[test]
fn flash_attention_heads_of_80_on_the_128_kernels() {
    case(11, Storage::BF16, &[70, 1, 129], 3, 80, Kernels::Tile(128));
}

/// Heads of 80 as 64 + 16 (`flash_split`), the kernels the engine runs for OPT-2.7B; several
/// pipeline iterations per program, bf16 and f16.
#[test]
fn flash_attention_split_heads_of_80() {
    case(12, Storage::BF16, &[70, 1, 129], 3, 80, Kernels::Split);
    case(13, Storage::F16, &[200, 64], 2, 80, Kernels::Split);
}

/// Many key blocks per query block and query blocks per key block (several pipeline
/// iterations, resident operands reused across them), and a last partial block whose rows past
/// the sequence's end must contribute nothing to dk/dv.
#[test]
fn flash_attention_long_sequence_unmasked_blocks() {
    case(10, Storage::BF16, &[300, 40], 1, 64, Kernels::Tile(64));
}
