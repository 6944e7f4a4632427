//! The block-sparse flash-attention kernels in the interpreter (the GPU's numerics) against
//! the masked f64 CPU references `lexp_kernels::reference::{attention_fwd_masked,
//! attention_bwd_masked}`: packed batches of uneven sequences, random kept key blocks per
//! (sequence, query block, head) with the diagonal always kept, outputs poisoned before each
//! run. A key block no row keeps must come out with zero dk and dv.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_kernels::flash_attention::flash_bwd_delta;
use lexp_kernels::reference::{self, compare, AttnShape, POISON};
use lexp_kernels::sparse_flash::{
    block_table, sparse_flash_dkdv, sparse_flash_dq, sparse_flash_fwd, transpose, DeviceList,
    TableRow,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KB: usize = 128;

fn poisoned(dtype: Storage, dims: &[usize]) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![POISON; dims.iter().product()])
}

fn table(rows: &[TableRow]) -> HostTensor {
    let f: Vec<f32> = rows.iter().flatten().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, &[rows.len(), 4], &f)
}

fn list(l: &DeviceList) -> (HostTensor, HostTensor) {
    let c: Vec<f32> = l.counts.iter().map(|&x| x as f32).collect();
    let i: Vec<f32> = l.indices.iter().map(|&x| x as f32).collect();
    (
        HostTensor::new(Storage::I32, &[c.len()], &c),
        HostTensor::new(Storage::I32, &[c.len(), l.width], &i),
    )
}

fn random(rng: &mut StdRng, dtype: Storage, dims: &[usize]) -> HostTensor {
    let v: Vec<f32> = (0..dims.iter().product::<usize>())
        .map(|_| rng.gen_range(-2.0..2.0))
        .collect();
    HostTensor::new(dtype, dims, &v)
}

/// Forward and backward on sequences of `lens`, `nh` heads of `hd`, each causal off-diagonal
/// key block kept with probability `p`; `tiles` are the (fwd BN, dkdv BN/BM, dq BM) choices.
#[allow(clippy::too_many_arguments)]
fn case(
    seed: u64,
    dtype: Storage,
    lens: &[usize],
    nh: usize,
    hd: usize,
    p: f64,
    fwd_bn: usize,
    (dkdv_bn, dkdv_bm): (usize, usize),
    dq_bm: usize,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cu = vec![0usize];
    for l in lens {
        cu.push(cu.last().unwrap() + l);
    }
    let t = *cu.last().unwrap();
    let h = nh * hd;
    // Kept key blocks per (sequence, query block, head), compressed rows.
    let nblocks: Vec<usize> = lens.iter().map(|l| l.div_ceil(KB)).collect();
    let (mut offsets, mut keys) = (vec![0usize], vec![]);
    let mut kept = std::collections::HashSet::new();
    for (s, &n) in nblocks.iter().enumerate() {
        for qb in 0..n {
            for head in 0..nh {
                for kb in 0..=qb {
                    if kb == qb || rng.gen_bool(p) {
                        keys.push(kb as u32);
                        kept.insert((s, head, qb, kb));
                    }
                }
                offsets.push(keys.len());
            }
        }
    }
    let keep =
        |s: usize, head: usize, i: usize, j: usize| kept.contains(&(s, head, i / KB, j / KB));
    let mut qkv = random(&mut rng, dtype, &[t, 3 * nh, hd]);
    let scale = (hd as f64).powf(-0.5);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let sh = AttnShape {
        cu_seqlens: &cu,
        nh,
        hd,
        scale,
    };
    let what = format!("{dtype:?} lens {lens:?} heads {nh} of {hd}, p {p}");
    let fwd_list = DeviceList::from_rows(&offsets, &keys).unwrap();
    let (to, ti) = transpose(&nblocks, nh, &offsets, &keys).unwrap();
    let t_list = DeviceList::from_rows(&to, &ti).unwrap();
    let (mut counts, mut indices) = list(&fwd_list);
    let (mut counts_t, mut indices_t) = list(&t_list);

    let (want_o, want_l) = reference::attention_fwd_masked(&qkv.data, sh, &keep);
    let mut o = poisoned(dtype, &[t, nh, hd]);
    let tp = t.div_ceil(4) * 4;
    let mut lse2 = poisoned(Storage::F32, &[nh, tp]);
    let mut qb = table(&block_table(&cu, 128, KB, true).unwrap());
    sparse_flash_fwd::interpret(
        &[("D", hd), ("BN", fwd_bn)],
        sparse_flash_fwd::HostArgs {
            qkv: &mut qkv,
            qblocks: &mut qb,
            counts: &mut counts,
            indices: &mut indices,
            scale_log2,
            o: &mut o,
            lse2: &mut lse2,
        },
    )
    .unwrap();
    let d = compare(&o.data, &want_o);
    println!("{what}: o {d}");
    assert!(
        d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 1e-2,
        "{what}: o {d}"
    );
    let got_l: Vec<f32> = lse2.data.chunks(tp).flat_map(|r| r[..t].to_vec()).collect();
    let d = compare(&got_l, &want_l);
    assert!(
        d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 1e-5,
        "{what}: lse2 {d}"
    );

    let mut d_o = random(&mut rng, dtype, &[t, nh, hd]);
    let want = reference::attention_bwd_masked(&qkv.data, &d_o.data, sh, &keep);
    let mut delta = poisoned(Storage::F32, &[nh, tp]);
    flash_bwd_delta::interpret(
        &[("D", hd)],
        flash_bwd_delta::HostArgs {
            o: &mut o,
            d_o: &mut d_o,
            delta: &mut delta,
        },
    )
    .unwrap();
    let mut dqkv = poisoned(dtype, &[t, 3 * nh, hd]);
    let mut kt = table(&block_table(&cu, dkdv_bn, KB, false).unwrap());
    sparse_flash_dkdv::interpret(
        &[("D", hd), ("BN", dkdv_bn), ("BM", dkdv_bm)],
        sparse_flash_dkdv::HostArgs {
            qkv: &mut qkv,
            d_o: &mut d_o,
            lse2: &mut lse2,
            delta: &mut delta,
            kblocks: &mut kt,
            counts_t: &mut counts_t,
            indices_t: &mut indices_t,
            scale_log2,
            scale: scale as f32,
            dqkv: &mut dqkv,
        },
    )
    .unwrap();
    let mut qt = table(&block_table(&cu, dq_bm, KB, true).unwrap());
    sparse_flash_dq::interpret(
        &[("D", hd), ("BM", dq_bm)],
        sparse_flash_dq::HostArgs {
            qkv: &mut qkv,
            d_o: &mut d_o,
            lse2: &mut lse2,
            delta: &mut delta,
            qblocks: &mut qt,
            counts: &mut counts,
            indices: &mut indices,
            scale_log2,
            scale: scale as f32,
            dqkv: &mut dqkv,
        },
    )
    .unwrap();
    for (b, name) in [(0, "dq"), (1, "dk"), (2, "dv")] {
        let pick = |x: &[f32]| -> Vec<f32> {
            (0..t)
                .flat_map(|r| x[r * 3 * h + b * h..r * 3 * h + (b + 1) * h].to_vec())
                .collect()
        };
        let d = compare(&pick(&dqkv.data), &pick(&want));
        println!("{what}: {name} {d}");
        assert!(
            d.unwritten == 0 && d.non_finite == 0 && d.rel_l2 < 2e-2,
            "{what}: {name} {d}"
        );
    }
    // The dropped blocks really were skipped: the dense gradient differs.
    let dense = reference::attention_bwd(&qkv.data, &d_o.data, sh);
    assert!(
        compare(&dense, &want).rel_l2 > 0.05,
        "{what}: the mask drops too little to test anything"
    );
}

#[test]
fn sparse_flash_bf16_uneven_packed_batch() {
    case(
        11,
        Storage::BF16,
        &[300, 1, 129],
        2,
        64,
        0.4,
        128,
        (128, 64),
        128,
    );
}

#[test]
fn sparse_flash_f16_sub_block_steps() {
    // 64-key forward steps and 64-query dq programs: two programs or steps per block.
    case(12, Storage::F16, &[384, 70], 1, 64, 0.5, 64, (128, 64), 64);
}

#[test]
fn sparse_flash_head_dim_128() {
    case(
        13,
        Storage::BF16,
        &[260, 129],
        2,
        128,
        0.4,
        32,
        (64, 32),
        32,
    );
}
