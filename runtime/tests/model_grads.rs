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
use lexp_runtime::model::{
    self, AttentionHook, AttentionInput, AttentionMask, DropoutRng, Exposure, MaskSource, MlpHook,
    MlpMask, ModelError,
};
use lexp_runtime::peft::{LoraConfig, LoraParams, LoraTarget, PeftParams};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

fn config(extra: &str) -> OptConfig {
    config_with_positions(extra, 16)
}

fn config_with_positions(extra: &str, positions: usize) -> OptConfig {
    let json = format!(
        r#"{{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 32,
            "num_attention_heads": 2, "max_position_embeddings": {positions} {extra}}}"#
    );
    OptConfig::from_json(&json, Path::new("test-config.json")).unwrap()
}

fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

fn batch(vocab: u32) -> PackedBatch {
    batch_of_lengths(vocab, &[5, 9, 2])
}

/// Random tokens in sequences of `lens`; every other position of sequence 1 is not scored.
fn batch_of_lengths(vocab: u32, lens: &[usize]) -> PackedBatch {
    let mut rng = SplitMix64::new(3);
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
    let b = batch(config.vocab_size as u32);
    check_exposed(name, config, lora_dropout, Exposure::NONE, &b)
}

/// [`check`] with exposure hooks on batch `b`: the gradients must be exact for the sparse
/// forward too.
fn check_exposed(
    name: &str,
    config: OptConfig,
    lora_dropout: f32,
    exposure: Exposure<'_>,
    b: &PackedBatch,
) {
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
    let n = b.num_targets() as f32;
    let rng = DropoutRng { seed: 77 };
    let drop = Some(&rng as &dyn MaskSource);
    let params = PeftParams::from(lora.clone());
    let out = model::loss_and_grads_exposed(&model, &params, b, 1.0 / n, drop, exposure).unwrap();
    let loss = |l: &LoraParams| {
        let l = PeftParams::from(l.clone());
        let fwd = model::forward_exposed(&model, Some(&l), b, drop, exposure, false).unwrap();
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
    let sparse = model::forward_exposed(
        &model(),
        None,
        &b,
        None,
        Exposure::of_mlp(&FixedMask),
        false,
    )
    .unwrap();
    assert!(dense
        .hidden
        .iter()
        .zip(&sparse.hidden)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    check_exposed(
        "pre-LN, half the MLP blocks",
        config(""),
        0.2,
        Exposure::of_mlp(&FixedMask),
        &b,
    );
}

/// Keeps a random half of the off-diagonal causal (8-query, 4-key) blocks, drawn per layer
/// from a seeded generator (the same mask at every call), and counts the layers it observed
/// with a mask.
struct RandomKeyBlocks {
    seed: u64,
    observed: AtomicUsize,
}

impl AttentionHook for RandomKeyBlocks {
    fn select(&self, layer: usize, input: AttentionInput<'_>) -> Option<AttentionMask> {
        let mut rng = SplitMix64::new(self.seed + layer as u64);
        Some(AttentionMask::from_fn(
            input.cu_seqlens,
            input.heads,
            8,
            4,
            |_, _, _, _| rng.next_u64() % 2 == 0,
        ))
    }

    fn observe(&self, _layer: usize, input: AttentionInput<'_>, mask: Option<&AttentionMask>) {
        assert_eq!(input.q.len(), input.k.len());
        if mask.is_some() {
            self.observed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn attention_exposure_gradients_are_exact_for_the_masked_forward() {
    // A 27-token sequence spans 4 query blocks of 8 and 7 key blocks of 4: with half the
    // off-diagonal blocks dropped, whole key blocks really vanish from later queries.
    let config = || config_with_positions("", 32);
    let b = batch_of_lengths(50, &[3, 27, 12]);
    let hook = RandomKeyBlocks {
        seed: 21,
        observed: AtomicUsize::new(0),
    };
    let mask = hook
        .select(
            0,
            AttentionInput {
                q: &[],
                k: &[],
                cu_seqlens: &b.cu_seqlens,
                heads: 2,
                head_dim: 8,
            },
        )
        .unwrap();
    assert!(mask.density() < 0.9, "density {}", mask.density());
    let model = || {
        let c = config();
        let weights = OptWeights::random(&c, 11, 0.3);
        OptModel { config: c, weights }
    };
    let dense = model::forward(&model(), None, &b, None, false).unwrap();
    let masked = model::forward_exposed(
        &model(),
        None,
        &b,
        None,
        Exposure::of_attention(&hook),
        false,
    )
    .unwrap();
    assert_eq!(
        hook.observed.load(Ordering::Relaxed),
        2,
        "one mask per layer"
    );
    // The mask changes the function: the masked hidden states differ from the dense ones.
    assert!(dense
        .hidden
        .iter()
        .zip(&masked.hidden)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    check_exposed(
        "pre-LN, random half of the key blocks",
        config(),
        0.2,
        Exposure::of_attention(&hook),
        &b,
    );
    check_exposed(
        "post-LN, random key blocks and half the MLP blocks",
        config_with_positions(r#", "do_layer_norm_before": false"#, 32),
        0.0,
        Exposure {
            mlp: Some(&FixedMask),
            attention: Some(&hook),
        },
        &b,
    );
}

/// Returns a mask made for one head fewer than the model has.
struct WrongHeads;

impl AttentionHook for WrongHeads {
    fn select(&self, layer: usize, input: AttentionInput<'_>) -> Option<AttentionMask> {
        (layer == 1).then(|| AttentionMask::dense(input.cu_seqlens, input.heads - 1, 8, 4))
    }
}

#[test]
fn an_unfit_attention_mask_is_an_error_naming_the_layer() {
    let config = config("");
    let weights = OptWeights::random(&config, 11, 0.3);
    let model = OptModel { config, weights };
    let b = batch(50);
    let err = model::forward_exposed(
        &model,
        None,
        &b,
        None,
        Exposure::of_attention(&WrongHeads),
        false,
    )
    .err()
    .expect("a mask for the wrong head count must be refused");
    assert!(
        matches!(err, ModelError::AttentionMask { layer: 1, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("layer 1") && msg.contains("heads"), "{msg}");
}
