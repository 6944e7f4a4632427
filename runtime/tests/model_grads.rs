//! The hand-written backward against finite differences, on small random models covering the
//! OPT variants the fixtures do not: post-LN with `project_in/out` (opt-350m's shape), no biases,
//! LayerNorms without parameters, an untied head, `_remove_final_layer_norm`, with residual and
//! LoRA dropout on and LoRA on all six projections (RUNTIME.md §2.9).
//!
//! For each adapted module, the derivative of the loss along the unit direction of its analytic
//! gradient (central differences of the f32 forward, same dropout masks; median of three step
//! sizes) must equal the gradient's norm within 2%.

use lexp_runtime::checkpoint::{OptConfig, OptModel, OptWeights};
use lexp_runtime::data::{PackedBatch, SplitMix64, IGNORE_INDEX};
use lexp_runtime::model::{self, DropoutRng, MaskSource, MlpHook, MlpMask};
use lexp_runtime::peft::{LoraConfig, LoraParams, LoraTarget};
use std::path::Path;

fn config(extra: &str) -> OptConfig {
    let json = format!(
        r#"{{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 32,
            "num_attention_heads": 2, "max_position_embeddings": 16 {extra}}}"#
    );
    OptConfig::from_json(&json, Path::new("test-config.json")).unwrap()
}

fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

fn batch(vocab: u32) -> PackedBatch {
    let mut rng = SplitMix64::new(3);
    let lens = [5usize, 9, 2];
    let mut b = PackedBatch {
        cu_seqlens: vec![0],
        ..Default::default()
    };
    for (s, &len) in lens.iter().enumerate() {
        let ids: Vec<u32> = (0..len)
            .map(|_| rng.below(u64::from(vocab)) as u32)
            .collect();
        for t in 0..len {
            b.input_ids.push(ids[t]);
            b.position_ids.push(t as u32);
            // Every other position of the middle sequence is not scored.
            let scored = t + 1 < len && !(s == 1 && t % 2 == 0);
            b.targets.push(if scored {
                ids[t + 1] as i32
            } else {
                IGNORE_INDEX
            });
        }
        b.cu_seqlens.push(b.input_ids.len() as i32);
        b.examples.push(s);
    }
    b
}

fn check(name: &str, config: OptConfig, lora_dropout: f32) {
    check_exposed(name, config, lora_dropout, None)
}

/// [`check`] with MLP exposure: the gradients must be exact for the sparse forward too.
fn check_exposed(name: &str, config: OptConfig, lora_dropout: f32, mlp: Option<&dyn MlpHook>) {
    let weights = OptWeights::random(&config, 11, 0.3);
    let model = OptModel { config, weights };
    let lora_config = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: lora_dropout,
        targets: LoraTarget::ALL.to_vec(),
        use_rslora: false,
    };
    let mut lora = LoraParams::init(&lora_config, &model.config, 5);
    let mut rng = SplitMix64::new(9);
    for (_, m) in lora.tensors_mut() {
        m.data.iter_mut().for_each(|v| *v = 0.3 * uniform(&mut rng));
    }
    let b = batch(model.config.vocab_size as u32);
    let n = b.num_targets() as f32;
    let rng = DropoutRng { seed: 77 };
    let drop = Some(&rng as &dyn MaskSource);
    let out = model::loss_and_grads_exposed(&model, &lora, &b, 1.0 / n, drop, mlp).unwrap();
    let loss = |l: &LoraParams| {
        let fwd = model::forward_exposed(&model, Some(l), &b, drop, mlp, false).unwrap();
        model::opt::head_loss(&model, &fwd, &b.targets, None)
            .unwrap()
            .loss_sum
            / f64::from(n)
    };
    let base = loss(&lora);
    assert!(
        (base - out.loss_sum / f64::from(n)).abs() < 1e-9,
        "{name}: forward with and without saving differ"
    );
    let mut worst = 0.0f64;
    for layer in 0..model.config.num_hidden_layers {
        for t in LoraTarget::ALL {
            let (ga, gb) = out.grads.get(layer, t).unwrap();
            let (ga, gb) = (ga.to_vec(), gb.to_vec());
            // Along the analytic gradient's own unit direction the derivative is its norm:
            // the largest signal over f32 rounding, and any error of scale, sign or placement
            // within the module shows (a wrong gradient does not point uphill by its norm).
            let norm = ga
                .iter()
                .chain(&gb)
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>()
                .sqrt();
            let unit = |g: &[f32]| -> Vec<f32> {
                g.iter().map(|&x| (f64::from(x) / norm) as f32).collect()
            };
            let (dir_a, dir_b) = (unit(&ga), unit(&gb));
            let derivative = |eps: f32| {
                let shifted = |sign: f32| {
                    let mut l = lora.clone();
                    let m = l.get_mut(layer, t).unwrap();
                    m.a.data
                        .iter_mut()
                        .zip(&dir_a)
                        .for_each(|(v, d)| *v += sign * eps * d);
                    m.b.data
                        .iter_mut()
                        .zip(&dir_b)
                        .for_each(|(v, d)| *v += sign * eps * d);
                    loss(&l)
                };
                (shifted(1.0) - shifted(-1.0)) / (2.0 * f64::from(eps))
            };
            // The median over three step sizes: robust to one step crossing a ReLU kink.
            let mut fd = [derivative(3e-3), derivative(1e-3), derivative(3e-4)];
            fd.sort_by(f64::total_cmp);
            let err = (fd[1] - norm).abs() / norm;
            worst = worst.max(err);
            assert!(
                err < 1e-2,
                "{name}: layer {layer} {}: gradient norm {norm:.6e}, finite differences along it {:?}",
                t.peft_name(),
                fd
            );
        }
    }
    eprintln!("{name}: loss {base:.4}, worst relative error of the 12 modules' directional derivatives {worst:.2e}");
}

#[test]
fn pre_ln_with_residual_and_lora_dropout() {
    check("pre-LN", config(""), 0.2);
}

#[test]
fn post_ln_with_projections_like_opt_350m() {
    check(
        "post-LN + project_in/out",
        config(r#", "do_layer_norm_before": false, "word_embed_proj_dim": 8"#),
        0.0,
    );
}

#[test]
fn no_biases_plain_layer_norms_untied_head_no_final_ln() {
    check(
        "no bias, non-affine LN, untied, no final LN",
        config(
            r#", "enable_bias": false, "layer_norm_elementwise_affine": false,
               "tie_word_embeddings": false, "_remove_final_layer_norm": true"#,
        ),
        0.1,
    );
}

/// Keeps a fixed, layer-dependent half of the (4-row group, 8-neuron block) pairs.
struct FixedMask;

impl MlpHook for FixedMask {
    fn select(&self, layer: usize, _ffn_in: &[f32], rows: usize) -> Option<MlpMask> {
        let mut m = MlpMask::dense(rows, 32, 4, 8);
        for (i, k) in m.keep.iter_mut().enumerate() {
            *k = (i + layer) % 2 == 0;
        }
        Some(m)
    }
}

#[test]
fn mlp_exposure_gradients_are_exact_for_the_sparse_forward() {
    let model = || {
        let config = config("");
        let weights = OptWeights::random(&config, 11, 0.3);
        OptModel { config, weights }
    };
    // The mask changes the function: the sparse loss differs from the dense one.
    let b = batch(50);
    let dense = model::forward(&model(), None, &b, None, false).unwrap();
    let sparse = model::forward_exposed(&model(), None, &b, None, Some(&FixedMask), false).unwrap();
    assert!(dense
        .hidden
        .iter()
        .zip(&sparse.hidden)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    check_exposed(
        "pre-LN, half the MLP blocks",
        config(""),
        0.2,
        Some(&FixedMask),
    );
}
