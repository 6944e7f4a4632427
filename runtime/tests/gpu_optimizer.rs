//! AdamW on the device (`GpuEngine::optimizer_step`) against the host step
//! (`train::host_optimizer_step`: host gradient sum, `clip_grad_norm`, `AdamW::step`) on the
//! same GPU engine. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.
//!
//! Six steps of two micro-batches each on the bundled opt-tiny with random LoRA (B ≠ 0) on all
//! six projections, alternating a clipping limit far under the gradient norm with one far
//! over it: every step's loss, gradient norm and whether it was applied agree; the adapters
//! stay within f32 rounding of each other; after `sync_optimizer` the moments match the
//! host's and the state saves; a step after the sync (moments uploaded again) still agrees;
//! a NaN in the adapter skips the step on the device without touching adapter or optimizer.

mod common;

use common::gpu::{assets, batch, compare, device, enabled, random_lora};
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::PackedBatch;
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::optim::{AdamW, AdamWConfig};
use lexp_runtime::peft::LoraParams;
use lexp_runtime::train::{host_optimizer_step, Engine, OptimStep, StepOutcome};

fn flat(lora: &LoraParams) -> Vec<f32> {
    lora.tensors()
        .into_iter()
        .flat_map(|(_, t)| t.data.clone())
        .collect()
}

fn adamw_for(lora: &LoraParams) -> AdamW {
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
        rel <= 1e-2,
        "{what}: norm {} vs {}",
        dev.grad_norm,
        host.grad_norm
    );
}

/// An engine with its adapter and optimizer.
type Side<'a> = (&'a mut GpuEngine, &'a mut LoraParams, &'a mut AdamW);

/// One step of both engines on `micro`, compared.
fn step(i: usize, micro: &[PackedBatch], dev: Side<'_>, host: Side<'_>, lora0: &LoraParams) {
    let (on_dev, lora_d, adam_d) = dev;
    let (on_host, lora_h, adam_h) = host;
    let s = OptimStep {
        batches: micro,
        dropout: None,
        lr: 2e-3 * (1.0 + 0.1 * i as f32),
        // Clipped (far under the norm) on even steps, not on odd ones.
        max_grad_norm: if i % 2 == 0 { 1e-3 } else { 1e3 },
    };
    let d = on_dev.optimizer_step(lora_d, adam_d, &s).unwrap();
    let h = host_optimizer_step(on_host, lora_h, adam_h, &s).unwrap();
    check_same(&format!("step {}", i + 1), &d, &h);
    assert!(d.applied);
    assert!(adam_d.moments_on_device() && !adam_h.moments_on_device());
    assert_eq!(adam_d.step_count(), adam_h.step_count());
    let (want, got, base) = (flat(lora_h), flat(lora_d), flat(lora0));
    let delta = |x: &[f32]| -> Vec<f32> { x.iter().zip(&base).map(|(a, b)| a - b).collect() };
    let (err, cos) = compare(&delta(&got), &delta(&want));
    println!(
        "step {}: {d:?}; adapter update rel error {err:.2e}, cosine {cos:.6}",
        i + 1
    );
    assert!(err <= 1e-2 && cos >= 0.9999, "step {}: {err} {cos}", i + 1);
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

    for i in 0..6 {
        step(
            i,
            &micro,
            (&mut on_dev, &mut lora_d, &mut adam_d),
            (&mut on_host, &mut lora_h, &mut adam_h),
            &lora0,
        );
    }

    // The moments come back and match the host's; the state then saves.
    on_dev.sync_optimizer(&mut adam_d).unwrap();
    assert!(!adam_d.moments_on_device());
    let (sd, sh) = (adam_d.state().unwrap(), adam_h.state().unwrap());
    assert_eq!(sd.step, 6);
    for (name, (a, b)) in [("m", (&sd.m, &sh.m)), ("v", (&sd.v, &sh.v))] {
        let (x, y): (Vec<f32>, Vec<f32>) = (a.concat(), b.concat());
        let (err, cos) = compare(&x, &y);
        println!("{name}: rel error {err:.2e}, cosine {cos:.6}");
        assert!(err <= 1e-2 && cos >= 0.9999, "{name}: {err} {cos}");
    }
    let dir = std::env::temp_dir().join(format!("lexp-gpu-optimizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names: Vec<String> = lora_d.tensors().into_iter().map(|(k, _)| k).collect();
    adam_d
        .save(&dir.join("optimizer.safetensors"), &names)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    // A step after the sync uploads the moments again and still agrees.
    step(
        6,
        &micro,
        (&mut on_dev, &mut lora_d, &mut adam_d),
        (&mut on_host, &mut lora_h, &mut adam_h),
        &lora0,
    );

    // A NaN in the adapter: the loss is not finite, the device skips the update. (Host edits
    // of the adapter reach the device only while the host holds the optimizer state.)
    on_dev.sync_optimizer(&mut adam_d).unwrap();
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
