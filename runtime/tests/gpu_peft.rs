//! BitFit and Houlsby adapters on the GPU engine (RUNTIME.md §2.7, §2.8) against the CPU
//! engine, alone and with LoRA: the trained biases and the adapters in the forward, every
//! gradient, the base model back for an evaluation without them, AdamW on the device against
//! the host step (trajectories, and one step from the same state element by element); and
//! both methods with a sparse MLP (random block lists) against the CPU model keeping the same
//! blocks. Opt-in with `LEXP_GPU_TESTS=1`.

mod common;

use common::gpu::{
    batch, bf16_weights, compare, device, enabled, models, random_lora, random_lora_on,
};
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::PackedBatch;
use lexp_runtime::data::SplitMix64;
use lexp_runtime::gpu::sparse_mlp::SyntheticMlp;
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::model;
use lexp_runtime::model::{MlpHook, MlpMask, PeftGrads};
use lexp_runtime::optim::{AdamW, AdamWConfig};
use lexp_runtime::peft::{
    BitFitConfig, BitFitParams, HoulsbyConfig, HoulsbyParams, LoraTarget, PeftParams,
};
use lexp_runtime::train::{host_optimizer_step, Engine, OptimStep};

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
        let mut gpu = GpuEngine::new(loaded.clone(), device()).unwrap_or_else(|e| panic!("{e}"));
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
            check_grads(&format!("{name} {what}"), &params, &got.grads, &want.grads);

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

            device_adamw_matches_the_host(&format!("{name} {what}"), &loaded, &params, &b);
        }
    }
}

/// Every trained tensor's gradient `got` against the CPU's `want` (rel-Frobenius ≤ 0.15 and
/// cosine ≥ 0.99 each, all together cosine ≥ 0.997). A key bias's gradient is zero up to
/// rounding (softmax ignores it) and is skipped.
fn check_grads(label: &str, params: &PeftParams, got: &PeftGrads, want: &PeftGrads) {
    let names: Vec<String> = params.tensors().into_iter().map(|(k, _)| k).collect();
    let (g, c) = (got.flat(), want.flat());
    assert_eq!((g.len(), c.len()), (names.len(), names.len()));
    let (mut all_g, mut all_c) = (vec![], vec![]);
    for ((k, g), c) in names.iter().zip(&g).zip(&c) {
        if k.ends_with("k_proj.bias") {
            continue;
        }
        let (rel, cos) = compare(g, c);
        println!("  {k}: rel-Frobenius {rel:.2e}, cosine {cos:.6}");
        assert!(
            rel <= 0.15 && cos >= 0.99,
            "{label}: {k}: rel {rel}, cos {cos}"
        );
        all_g.extend_from_slice(g);
        all_c.extend_from_slice(c);
    }
    let (rel, cos) = compare(&all_g, &all_c);
    println!("{label}: all gradients rel-Frobenius {rel:.2e}, cosine {cos:.6}");
    assert!(cos >= 0.997, "{label}: all gradients cosine {cos}");
}

/// Every PEFT part (LoRA, BitFit, Houlsby) through AdamW on the device against the host step
/// (`host_optimizer_step`, the same GPU's gradients), as `gpu_optimizer.rs` does for LoRA:
///
/// 1. three steps each on two engines, the device keeping its moments and parameters between
///    steps (nothing uploaded): the trajectories agree in loss and gradient norm. They are not
///    compared element-wise: the device's f32 scalars can differ from the host's in the last
///    bit, a last-bit difference can flip a value's bf16 rounding, and AdamW's normalisation
///    magnifies that on elements with tiny gradients in the next step.
/// 2. from the same state (the host takes the device's parameters and moments), one step
///    each: the updates agree to f32 rounding, element by element, and so do the moments.
fn device_adamw_matches_the_host(
    what: &str,
    model: &OptModel,
    params: &PeftParams,
    b: &PackedBatch,
) {
    let sizes: Vec<usize> = params.tensors().iter().map(|(_, m)| m.data.len()).collect();
    let adamw = AdamW::new(
        AdamWConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        &sizes,
    );
    let step = OptimStep {
        batches: std::slice::from_ref(b),
        dropout: None,
        lr: 1e-3,
        max_grad_norm: 1.0,
    };
    let mut on_dev = GpuEngine::new(model.clone(), device()).unwrap();
    let mut on_host = GpuEngine::new(model.clone(), device()).unwrap();
    let (mut pd, mut ph) = (params.clone(), params.clone());
    let (mut ad, mut ah) = (adamw.clone(), adamw);
    for i in 0..3 {
        let d = on_dev.optimizer_step(&mut pd, &mut ad, &step).unwrap();
        let h = host_optimizer_step(&mut on_host, &mut ph, &mut ah, &step).unwrap();
        println!(
            "{what}: step {i}: device loss {:.5} norm {:.5}, host loss {:.5} norm {:.5}",
            d.loss, d.grad_norm, h.loss, h.grad_norm
        );
        assert!(d.applied && h.applied && ad.moments_on_device());
        assert!(
            (d.loss - h.loss).abs() <= 2e-3 * h.loss.abs(),
            "{what}: {d:?} vs {h:?}"
        );
        let rel = ((d.grad_norm - h.grad_norm) / h.grad_norm).abs();
        assert!(rel <= 2e-2, "{what}: {d:?} vs {h:?}");
    }
    assert_ne!(&pd, params, "{what}: the steps moved nothing");

    // From the same state: one step each; then the moments come back.
    on_dev.sync_optimizer(&mut ad).unwrap();
    let (mut ph, mut ah) = (pd.clone(), ad.clone());
    let before = flat(&pd);
    on_dev.optimizer_step(&mut pd, &mut ad, &step).unwrap();
    host_optimizer_step(&mut on_host, &mut ph, &mut ah, &step).unwrap();
    let delta = |x: &[f32]| -> Vec<f32> { x.iter().zip(&before).map(|(a, b)| a - b).collect() };
    let (err, cos) = compare(&delta(&flat(&pd)), &delta(&flat(&ph)));
    println!("{what}: one step from the same state: update rel error {err:.2e}, cosine {cos:.8}");
    assert!(err <= 1e-3 && cos >= 0.99999, "{what}: update {err} {cos}");
    on_dev.sync_optimizer(&mut ad).unwrap();
    let (md, vd) = ad.moments().unwrap();
    let (mh, vh) = ah.moments().unwrap();
    for (which, d, h) in [
        ("m", md.concat(), mh.concat()),
        ("v", vd.concat(), vh.concat()),
    ] {
        let (err, cos) = compare(&d, &h);
        println!("{what}: {which}: rel error {err:.2e}, cosine {cos:.8}");
        assert!(
            err <= 1e-3 && cos >= 0.99999,
            "{what}: {which}: {err} {cos}"
        );
    }
}

fn flat(p: &PeftParams) -> Vec<f32> {
    p.tensors()
        .into_iter()
        .flat_map(|(_, t)| t.data.clone())
        .collect()
}

/// The CPU model's side of a GPU sparse MLP: layer `l` keeps the blocks of mask `l`.
struct ListMasks(Vec<MlpMask>);

impl MlpHook for ListMasks {
    fn select(&self, layer: usize, _ffn_in: &[f32], _rows: usize) -> Option<MlpMask> {
        Some(self.0[layer].clone())
    }
}

/// BitFit (fc1's bias gradient summed over the kept blocks only) and Houlsby adapters with
/// the sparse MLP of random block lists, against the CPU model keeping the same blocks.
#[test]
fn gpu_peft_methods_with_a_sparse_mlp_match_the_cpu_model() {
    if !enabled() {
        return;
    }
    for (name, dir) in models() {
        let loaded = OptModel::load(&dir).unwrap();
        let model = bf16_weights(&loaded);
        let mut gpu = GpuEngine::new(loaded, device()).unwrap_or_else(|e| panic!("{e}"));
        let big = batch(&dir, &(100..164).collect::<Vec<_>>());
        let n = big.num_targets();
        // LoRA on fc1/fc2 is refused with a sparse MLP (the compact activations).
        let attn = [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::Out];
        let lora = random_lora_on(&model, 4, 9, &attn).lora;
        gpu.set_synthetic_mlp(Some(SyntheticMlp {
            density: 0.25,
            block: 64,
            seed: 3,
        }))
        .unwrap();
        for (what, params) in [
            (
                "bitfit",
                PeftParams {
                    lora: None,
                    bitfit: Some(moved_bitfit(&model, 13)),
                    houlsby: None,
                },
            ),
            (
                "lora+bitfit+houlsby",
                PeftParams {
                    lora,
                    bitfit: Some(moved_bitfit(&model, 14)),
                    houlsby: Some(random_houlsby(&model, 15)),
                },
            ),
        ] {
            let scale = 1.0 / n as f32;
            let got = gpu.loss_and_grads(&params, &big, scale, None).unwrap();
            let f = model.config.ffn_dim;
            let lists = gpu.mlp_lists().unwrap();
            let masks = ListMasks(
                (0..model.config.num_hidden_layers)
                    .map(|l| lists.mask(gpu.device(), l, f).unwrap())
                    .collect(),
            );
            let exposure = model::Exposure {
                mlp: Some(&masks),
                attention: None,
            };
            let want = model::loss_and_grads_exposed(&model, &params, &big, scale, None, exposure)
                .unwrap();
            let dense = model::loss_and_grads(&model, &params, &big, scale, None).unwrap();
            let (lg, lc) = (got.loss_sum / n as f64, want.loss_sum / n as f64);
            let ld = dense.loss_sum / n as f64;
            println!("{name} {what} sparse MLP 25%: loss cpu {lc:.5} gpu {lg:.5} (dense {ld:.5})");
            assert!((lg - lc).abs() <= 1e-2, "{name} {what}: loss {lg} vs {lc}");
            assert!(
                (ld - lc).abs() > 1e-3,
                "{name} {what}: the lists changed nothing"
            );
            let label = format!("{name} {what}");
            check_grads(&label, &params, &got.grads, &want.grads);
            // Only the kept blocks' neurons have a fc1 bias gradient: not the dense one.
            let names = params.tensors().into_iter().map(|(k, _)| k);
            let (g, d) = (got.grads.flat(), dense.grads.flat());
            for ((k, g), d) in names.zip(&g).zip(&d) {
                if k.ends_with("fc1.bias") {
                    let (rel_dense, _) = compare(g, d);
                    assert!(rel_dense > 0.05, "{label}: {k} is the dense gradient");
                }
            }
        }
    }
}
