//! `select_blocks` (device-side block selection) in the interpreter against the f64 reference
//! of `lexp_kernels::reference_select` (block-major predictor outputs `[nb, t]`): every group's count and ids must be a selection the
//! greedy rule gives up to rounding (`check_selection`), and exactly the reference's when no
//! sum or running sum is within rounding of a decision.
//!
//! Token counts are mostly not multiples of the 128-row group; block counts are random below
//! each compiled bound `NB`; some cases copy block columns so that sums tie exactly (the lower
//! id must come first), some have whole groups without mass. Outputs are poisoned (counts -7,
//! ids -9): a slot past the count must keep its poison.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_kernels as k;
use lexp_kernels::reference_select::{check_selection, select_blocks};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const BM: usize = 128;

fn config() -> ProptestConfig {
    let cases = match std::env::var("PROPTEST_CASES") {
        Ok(_) => ProptestConfig::default().cases,
        Err(_) => 12,
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn selection_follows_the_greedy_rule(seed: u64,
                                         t in prop_oneof![3 => 1usize..=400, 1 => Just(256usize)],
                                         nb in 1usize..=64, budget in 0.05f64..=1.0,
                                         target in 0.3f32..=1.0, ties: bool, cold: bool,
                                         f32_in: bool) {
        let mut rng = StdRng::seed_from_u64(seed);
        let max_blocks = ((budget * nb as f64).ceil() as usize).clamp(1, nb);
        let scale = rng.gen_range(0.05f32..=3.0);
        // A few hot blocks per token over a cold background, as a ReLU MLP's masses look.
        let mut o: Vec<f32> = (0..t * nb)
            .map(|_| if rng.gen_bool(0.2) { rng.gen_range(0.0f32..=2.5) } else { rng.gen_range(-4.0f32..=0.2) })
            .collect();
        // Block-major, `[nb, t]`.
        if ties {
            for b in (1..nb).step_by(3) {
                o.copy_within((b - 1) * t..b * t, b * t);
            }
        }
        if cold {
            // The second group carries no mass at all.
            for b in 0..nb {
                for v in o.iter_mut().skip(b * t + BM).take(BM.min(t.saturating_sub(BM))) {
                    *v = -30.0;
                }
            }
        }
        let bias: Vec<f32> = (0..nb).map(|_| rng.gen_range(-0.3f32..=0.3)).collect();
        let dtype = if f32_in { Storage::F32 } else { Storage::BF16 };
        let mut ot = HostTensor::new(dtype, &[nb, t], &o);
        let mut bt = HostTensor::new(Storage::F32, &[nb], &bias);
        let groups = t.div_ceil(BM);
        let mut counts = HostTensor::new(Storage::I32, &[groups], &vec![-7.0; groups]);
        let mut indices = HostTensor::new(Storage::I32, &[groups, max_blocks], &vec![-9.0; groups * max_blocks]);
        let cfg = k::block_select::select_config(nb).expect("nb <= 64").to_vec();
        let what = format!("select_blocks {dtype:?} t={t} nb={nb} max_blocks={max_blocks} target={target}");
        k::select_blocks::interpret(&cfg, k::select_blocks::HostArgs {
            o: &mut ot, bias: &mut bt, scale, target, counts: &mut counts, indices: &mut indices,
        }).map_err(|e| TestCaseError::fail(format!("{what}: {e}")))?;
        // The reference reads the values the kernel read (rounded to the storage type).
        let want = select_blocks(&ot.data, (t, nb), &bias, scale, target, max_blocks, BM);
        for (g, r) in want.iter().enumerate() {
            let count = counts.data[g] as usize;
            prop_assert!(count >= 1 && count <= max_blocks, "{what}: group {g} count {}", counts.data[g]);
            let row = &indices.data[g * max_blocks..(g + 1) * max_blocks];
            let kept: Vec<i32> = row[..count].iter().map(|&v| v as i32).collect();
            prop_assert!(row[count..].iter().all(|&v| v == -9.0), "{what}: group {g} wrote past its count: {row:?}");
            check_selection(r, &kept, target, max_blocks, 1e-5)
                .map_err(|e| TestCaseError::fail(format!("{what}: group {g}: {e}")))?;
            if clear_margins(&r.sums, target) {
                prop_assert_eq!(&kept, &r.kept, "{}: group {}", what, g);
            }
        }
    }
}

/// Whether no two distinct sums, and no running sum in descending order, come within 1e-4 of
/// the total of each other or of the goal: then rounding cannot change the greedy choice and
/// the kernel must agree exactly (exact ties are fine: both sides break them by id).
fn clear_margins(sums: &[f64], target: f32) -> bool {
    let total: f64 = sums.iter().sum();
    let eps = 1e-4 * total;
    let mut s = sums.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let near_tie = s.windows(2).any(|w| w[0] != w[1] && w[0] - w[1] < eps);
    let goal = f64::from(target) * total;
    let mut run = 0.0;
    let near_goal = s.iter().any(|v| {
        run += v;
        (run - goal).abs() < eps
    });
    !near_tie && !near_goal
}
