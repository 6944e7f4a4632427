//! Attention exposure through the CPU model (DESIGN.md §7, attention) on the opt-tiny fixture:
//! the profile, the predictors trained from dense passes and measured on later windows, the
//! masked forward's loss against the dense one, and a guard probe with the real forward.

use lexp_runtime::exposure::attention::corpus;
use lexp_runtime::exposure::attention::guard::probe;
use lexp_runtime::exposure::attention::predictor::PredictorConfig;
use lexp_runtime::exposure::attention::profiler::ProfileSettings;
use lexp_runtime::exposure::attention::selection::SelectionParams;
use lexp_runtime::exposure::attention::sparse::{SparseAttention, SparseAttentionConfig};
use lexp_runtime::exposure::guard::GuardConfig;
use lexp_runtime::model::{self, opt::head_loss, Exposure};

mod common;

#[test]
fn attention_exposure_on_opt_tiny() {
    if !common::shared_available() {
        return;
    }
    let shared = common::shared_dir();
    let dir = shared.join("fixtures/opt-tiny");
    let data = shared.join("data/corpus/valid.txt");
    let seq = 512;
    let (model, windows) = corpus::load(&dir, &data, seq).unwrap();
    let c = &model.config;
    let (nl, nh) = (c.num_hidden_layers, c.num_attention_heads);
    // Blocks of 64 so that 512-token windows have rows worth choosing in.
    let (qb, kb) = (64, 64);

    // Profile: every head reported, oracle densities ordered and in (0, 1].
    let first = corpus::batches(&windows, 0..2, 2, seq, &data).unwrap();
    let settings = ProfileSettings {
        q_block: qb,
        k_block: kb,
        ..Default::default()
    };
    let prof = corpus::profile(&model, &first, settings, &mut || {}).unwrap();
    let rep = prof.report();
    assert_eq!(rep.len(), nl);
    for l in &rep {
        assert_eq!(l.heads.len(), nh);
        for h in &l.heads {
            let d: Vec<f64> = h.density_for.iter().map(|x| x[1]).collect();
            assert!(
                d[0] > 0.0 && d[0] <= d[1] && d[1] <= d[2] && d[2] <= 1.0,
                "{d:?}"
            );
            assert!(h.local_mass > 0.0 && h.local_mass + h.sink_mass <= 1.0 + 1e-9);
        }
    }

    // Predictors: trained on windows 0..6, measured on 8..10.
    let train = corpus::batches(&windows, 0..6, 2, seq, &data).unwrap();
    let eval = corpus::batches(&windows, 8..10, 2, seq, &data).unwrap();
    let base = SparseAttentionConfig {
        q_block: qb,
        k_block: kb,
        ..Default::default()
    };
    let variants = vec![("default".to_string(), PredictorConfig::default())];
    let (reports, hooks) = corpus::predictor_quality(
        &model,
        &train,
        &eval,
        base,
        &variants,
        100,
        &[0.9, 0.99],
        0.95,
        0,
        &mut || {},
    )
    .unwrap();
    for (l, pts) in reports[0].layers.iter().enumerate() {
        let (lo, hi) = (&pts[0], &pts[1]);
        assert!(lo.recall <= hi.recall + 1e-12 && lo.density <= hi.density + 1e-12);
        assert!(hi.recall >= 0.95, "layer {l}: {hi:?}");
        assert!(lo.oracle_density > 0.0 && lo.oracle_density <= 1.0);
        assert!(reports[0].at_goal[l].recall >= 0.95);
    }

    // The masked forward's loss: the Dense mode is exactly the unhooked forward, a high target
    // stays close to it, and the measured recall/density come from the forward's own masks.
    let hook = &hooks[0];
    let points = corpus::loss_gap(&model, hook, &eval, &[0.5, 0.99], &mut || {}).unwrap();
    let mut plain = (0.0, 0usize);
    for b in &eval {
        let fwd = model::forward_exposed(&model, None, b, None, Exposure::NONE, false).unwrap();
        let out = head_loss(&model, &fwd, &b.targets, None).unwrap();
        plain.0 += out.loss_sum;
        plain.1 += out.count;
    }
    assert_eq!(points[0].loss, plain.0 / plain.1 as f64);
    let (half, high) = (&points[1], &points[2]);
    assert!(high.gap.abs() < 0.01, "{high:?}");
    assert!(half.gap.abs() > high.gap.abs(), "{half:?} vs {high:?}");
    for l in 0..nl {
        assert!(half.density[l] < high.density[l] && high.density[l] <= 1.0);
        assert!(half.recall[l] < high.recall[l] && high.recall[l] >= 0.95);
    }

    // A guard probe through the real model: dense and measured passes, targets moved within
    // bounds, predictors refreshed.
    let cfg = GuardConfig {
        refresh_steps: 5,
        ..Default::default()
    };
    let fresh = SparseAttention::new(
        nl,
        nh,
        c.head_dim(),
        SparseAttentionConfig {
            selection: SelectionParams {
                target: 0.95,
                ..base.selection
            },
            ..base
        },
        1,
    )
    .unwrap();
    let batch = &eval[0];
    let report = probe(&cfg, &fresh, 3, |h| -> model::Result<f64> {
        let exposure = Exposure {
            mlp: None,
            attention: Some(h),
        };
        let fwd = model::forward_exposed(&model, None, batch, None, exposure, false)?;
        let out = head_loss(&model, &fwd, &batch.targets, None)?;
        Ok(out.loss_sum / out.count as f64)
    })
    .unwrap();
    assert!(report.dense_loss.is_finite() && report.sparse_loss.is_finite());
    assert_eq!(report.layers.len(), nl);
    assert_eq!(report.refresh_loss.len(), nl);
    for lp in &report.layers {
        assert!(lp.recall > 0.5 && lp.recall <= 1.0 + 1e-9 && lp.density < 1.0);
        assert!(lp.new_target >= cfg.min_target && lp.new_target <= cfg.max_target);
    }
    assert_eq!(
        fresh.targets(),
        report
            .layers
            .iter()
            .map(|l| l.new_target)
            .collect::<Vec<_>>()
    );
}
