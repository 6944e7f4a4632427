//! AdamW on the device (`GpuEngine::optimizer_step`) against the host step
//! (`train::host_optimizer_step`: host gradient sum, `clip_grad_norm`, `AdamW::step`) on the
//! same GPU engine. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.
//!
//! Steps of two micro-batches each on the bundled opt-tiny with random LoRA (B ≠ 0) on all six
//! projections, alternating a clipping limit far under the gradient norm with one far over it:
//! every step's loss, gradient norm and whether it was applied agree; from the same adapter,
//! each update agrees to f32 rounding, whether the moments were kept on the device since the
//! last step or just uploaded; after `sync_optimizer` the moments match the host's and the
//! state saves; a NaN in the adapter skips the step on the device without touching adapter
//! or optimizer.

mod common;

use common::gpu::{assets, batch, compare, device, enabled, random_lora};
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::PackedBatch;
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::optim::{AdamW, AdamWConfig};
use lexp_runtime::peft::PeftParams;
use lexp_runtime::train::{host_optimizer_step, Engine, OptimStep, StepOutcome};

fn flat(lora: &PeftParams) -> Vec<f32> {
    lora.tensors()
        .into_iter()
        .flat_map(|(_, t)| t.data.clone())
        .collect()
}

fn adamw_for(lora: &PeftParams) -> AdamW {
    let sizes: Vec<usize> = lora.tensors().iter().map(|(_, t)| t.data.len()).collect();
    AdamW::new(
        AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        &sizes,
    )
}

fn check_same(what: &str, dev: &StepOutcome, host: &StepOutcome) {
    assert_eq!(dev.applied, host.applied, "{what}: {dev:?} vs {host:?}");
    assert_eq!(dev.targets, host.targets, "{what}");
    assert!(
        (dev.loss - host.loss).abs() <= 2e-3 * host.loss.abs().max(1.0),
        "{what}: loss {} vs {}",
        dev.loss,
        host.loss
    );
    let rel = ((dev.grad_norm - host.grad_norm) / host.grad_norm).abs();
    assert!(
        rel <= 2e-2,
        "{what}: norm {} vs {}",
        dev.grad_norm,
        host.grad_norm
    );
}

/// An engine with its adapter and optimizer.
type Side<'a> = (&'a mut GpuEngine, &'a mut PeftParams, &'a mut AdamW);

/// The settings of step `i`: clipped (a limit far under the norm) on even steps, not on odd.
fn settings(micro: &[PackedBatch], i: usize) -> OptimStep<'_> {
    OptimStep {
        batches: micro,
        dropout: None,
        lr: 2e-3 * (1.0 + 0.1 * i as f32),
        max_grad_norm: if i % 2 == 0 { 1e-3 } else { 1e3 },
    }
}

/// Step `i` on both sides; returns `(device, host)` outcomes after checking they agree.
fn both(i: usize, micro: &[PackedBatch], dev: Side<'_>, host: Side<'_>) -> StepOutcome {
    let s = settings(micro, i);
    let d = dev.0.optimizer_step(dev.1, dev.2, &s).unwrap();
    let h = host_optimizer_step(host.0, host.1, host.2, &s).unwrap();
    check_same(&format!("step {}", i + 1), &d, &h);
    assert!(d.applied);
    assert!(dev.2.moments_on_device() && !host.2.moments_on_device());
    assert_eq!(dev.2.step_count(), host.2.step_count());
    d
}

#[test]
fn device_adamw_matches_the_host_step() {
    if !enabled() {
        return;
    }
    let model = OptModel::load(assets().join("opt-tiny")).unwrap();
    let micro = [
        batch(&assets().join("opt-tiny"), &[0, 3, 5, 8]),
        batch(&assets().join("opt-tiny"), &[1, 2, 13]),
    ];
    let mut on_dev = GpuEngine::new(model.clone(), device()).unwrap();
    let mut on_host = GpuEngine::new(model.clone(), device()).unwrap();
    let lora0 = random_lora(&model, 4, 21);
    let (mut lora_d, mut lora_h) = (lora0.clone(), lora0.clone());
    let (mut adam_d, mut adam_h) = (adamw_for(&lora0), adamw_for(&lora0));

    // Three independent steps: the trajectories agree in loss and norm. (They are not compared
    // element-wise: a last-bit difference of a parameter can flip its bf16 rounding, and
    // AdamW's normalisation magnifies the effect on elements with tiny gradients.)
    for i in 0..3 {
        both(
            i,
            &micro,
            (&mut on_dev, &mut lora_d, &mut adam_d),
            (&mut on_host, &mut lora_h, &mut adam_h),
        );
    }

    // Steps from the same state: before each, the host takes the device's adapter (its moments
    // stay its own, equal to the device's but for rounding). Every update then matches to
    // f32 rounding, with the moments staying on the device between steps, and once right
    // after they came back (step 4: uploaded again).
    on_dev.sync_optimizer(&mut adam_d).unwrap();
    assert!(!adam_d.moments_on_device());
    adam_h = adam_d.clone();
    for i in 3..8 {
        lora_h = lora_d.clone();
        let before = flat(&lora_d);
        let d = both(
            i,
            &micro,
            (&mut on_dev, &mut lora_d, &mut adam_d),
            (&mut on_host, &mut lora_h, &mut adam_h),
        );
        let delta = |x: &[f32]| -> Vec<f32> { x.iter().zip(&before).map(|(a, b)| a - b).collect() };
        let (err, cos) = compare(&delta(&flat(&lora_d)), &delta(&flat(&lora_h)));
        println!(
            "step {}: {d:?}; update rel error {err:.2e}, cosine {cos:.8}",
            i + 1
        );
        assert!(err <= 1e-3 && cos >= 0.99999, "step {}: {err} {cos}", i + 1);
    }

    // The moments come back and match the host's; the state then saves.
    on_dev.sync_optimizer(&mut adam_d).unwrap();
    let (sd, sh) = (adam_d.state().unwrap(), adam_h.state().unwrap());
    assert_eq!(sd.step, 8);
    for (name, (a, b)) in [("m", (&sd.m, &sh.m)), ("v", (&sd.v, &sh.v))] {
        let (x, y): (Vec<f32>, Vec<f32>) = (a.concat(), b.concat());
        let (err, cos) = compare(&x, &y);
        println!("{name}: rel error {err:.2e}, cosine {cos:.8}");
        assert!(err <= 1e-3 && cos >= 0.99999, "{name}: {err} {cos}");
    }
    let dir = std::env::temp_dir().join(format!("lexp-gpu-optimizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = lora_d.tensors().into_iter().map(|(k, _)| k).collect();
    adam_d
        .save(&dir.join("optimizer.safetensors"), &names)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // A NaN in the adapter: the loss is not finite, the device skips the update. (Host edits
    // of the adapter reach the device only while the host holds the optimizer state, as it
    // does after the sync above.)
    let mut bad = lora_d.clone();
    if let Some((_, t)) = bad.tensors_mut().into_iter().nth(1) {
        t.data[0] = f32::NAN;
    }
    let before = (flat(&bad), adam_d.step_count());
    let s = OptimStep {
        batches: &micro,
        dropout: None,
        lr: 1e-3,
        max_grad_norm: 1.0,
    };
    let out = on_dev.optimizer_step(&mut bad, &mut adam_d, &s).unwrap();
    assert!(!out.applied && !out.loss.is_finite(), "{out:?}");
    let after = (flat(&bad), adam_d.step_count());
    assert_eq!(before.1, after.1);
    assert!(before
        .0
        .iter()
        .zip(&after.0)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
