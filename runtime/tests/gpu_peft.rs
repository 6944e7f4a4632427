//! BitFit and Houlsby adapters on the GPU engine (RUNTIME.md §2.7, §2.8) against the CPU
//! engine, alone and with LoRA: the trained biases and the adapters in the forward, every
//! gradient, the base model back for an evaluation without them, and an optimizer step
//! through the host AdamW path. Opt-in with `LEXP_GPU_TESTS=1`.

mod common;

use common::gpu::{batch, bf16_weights, compare, device, enabled, models, random_lora};
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::SplitMix64;
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::model;
use lexp_runtime::optim::{AdamW, AdamWConfig};
use lexp_runtime::peft::{BitFitConfig, BitFitParams, HoulsbyConfig, HoulsbyParams, PeftParams};
use lexp_runtime::train::{Engine, OptimStep};

/// BitFit's biases moved off the base values (bf16-exact, so both engines use the same).
fn moved_bitfit(model: &OptModel, seed: u64) -> BitFitParams {
    let mut b = BitFitParams::init(&BitFitConfig::default(), model).unwrap();
    let mut rng = SplitMix64::new(seed);
    for (_, m) in b.tensors_mut() {
        for v in &mut m.data {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            *v = half::bf16::from_f32(*v + 0.2 * (2.0 * u - 1.0)).to_f32();
        }
    }
    b
}

/// ReLU Houlsby adapters of bottleneck 16 with every tensor random (bf16-exact).
fn random_houlsby(model: &OptModel, seed: u64) -> HoulsbyParams {
    let config = HoulsbyConfig {
        bottleneck: 16,
        ..HoulsbyConfig::default()
    };
    let mut p = HoulsbyParams::init(&config, &model.config, seed);
    let mut rng = SplitMix64::new(seed ^ 0xad);
    for (_, m) in p.tensors_mut() {
        for v in &mut m.data {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            *v = half::bf16::from_f32(*v + 0.05 * (2.0 * u - 1.0)).to_f32();
        }
    }
    p
}

#[test]
fn gpu_peft_methods_match_the_cpu_engine() {
    if !enabled() {
        return;
    }
    for (name, dir) in models() {
        let loaded = OptModel::load(&dir).unwrap();
        let model = bf16_weights(&loaded);
        let mut gpu = GpuEngine::new(loaded, device()).unwrap_or_else(|e| panic!("{e}"));
        let b = batch(&dir, &[0, 1, 2, 3, 5, 8]);
        let n = b.num_targets();
        let lora = random_lora(&model, 4, 7).lora;
        for (what, params) in [
            (
                "bitfit",
                PeftParams {
                    lora: None,
                    bitfit: Some(moved_bitfit(&model, 3)),
                    houlsby: None,
                },
            ),
            (
                "lora+bitfit",
                PeftParams {
                    lora: lora.clone(),
                    bitfit: Some(moved_bitfit(&model, 4)),
                    houlsby: None,
                },
            ),
            (
                "houlsby",
                PeftParams {
                    lora: None,
                    bitfit: None,
                    houlsby: Some(random_houlsby(&model, 5)),
                },
            ),
            (
                "lora+bitfit+houlsby",
                PeftParams {
                    lora,
                    bitfit: Some(moved_bitfit(&model, 6)),
                    houlsby: Some(random_houlsby(&model, 7)),
                },
            ),
        ] {
            let scale = 1.0 / n as f32;
            let got = gpu.loss_and_grads(&params, &b, scale, None).unwrap();
            let want = model::loss_and_grads(&model, &params, &b, scale, None).unwrap();
            let (lg, lc) = (got.loss_sum / n as f64, want.loss_sum / n as f64);
            println!("{name} {what}: loss cpu {lc:.5} gpu {lg:.5}");
            assert!((lg - lc).abs() <= 1e-2, "{name} {what}: loss {lg} vs {lc}");
            let names: Vec<String> = params.tensors().into_iter().map(|(k, _)| k).collect();
            let (g, c) = (got.grads.flat(), want.grads.flat());
            assert_eq!((g.len(), c.len()), (names.len(), names.len()));
            let (mut all_g, mut all_c) = (vec![], vec![]);
            for ((k, g), c) in names.iter().zip(&g).zip(&c) {
                // A key bias's gradient is zero up to rounding (softmax ignores it).
                if k.ends_with("k_proj.bias") {
                    continue;
                }
                let (rel, cos) = compare(g, c);
                println!("  {k}: rel-Frobenius {rel:.2e}, cosine {cos:.6}");
                assert!(
                    rel <= 0.15 && cos >= 0.99,
                    "{name} {what}: {k}: rel {rel}, cos {cos}"
                );
                all_g.extend_from_slice(g);
                all_c.extend_from_slice(c);
            }
            let (rel, cos) = compare(&all_g, &all_c);
            println!("{name} {what}: all gradients rel-Frobenius {rel:.2e}, cosine {cos:.6}");
            assert!(cos >= 0.997, "{name} {what}: all gradients cosine {cos}");

            // Evaluation with the adapter, then without it (the base biases come back).
            for (with, p) in [("with", Some(&params)), ("without", None)] {
                let (gs, gn) = gpu.eval_loss(p, &b).unwrap();
                let (cs, cn) = model::eval_loss(&model, p, &b).unwrap();
                assert_eq!(gn, cn);
                let (g, c) = (gs / gn as f64, cs / cn as f64);
                println!("{name} {what}: eval {with} the adapter: cpu {c:.5} gpu {g:.5}");
                assert!(
                    (g - c).abs() <= 1e-2,
                    "{name} {what} eval {with}: {g} vs {c}"
                );
            }

            // One optimizer step (host AdamW): the biases move, the loss is the CPU's.
            let mut p = params.clone();
            let sizes: Vec<usize> = p.tensors().iter().map(|(_, m)| m.data.len()).collect();
            let mut adamw = AdamW::new(
                AdamWConfig {
                    lr: 1e-3,
                    ..AdamWConfig::default()
                },
                &sizes,
            );
            let step = OptimStep {
                batches: std::slice::from_ref(&b),
                dropout: None,
                lr: 1e-3,
                max_grad_norm: 1.0,
            };
            let out = gpu.optimizer_step(&mut p, &mut adamw, &step).unwrap();
            assert!(out.applied && (out.loss - lc).abs() <= 1e-2, "{out:?}");
            assert_ne!(p, params, "{name} {what}: the step moved nothing");
        }
    }
}
