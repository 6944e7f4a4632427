//! The neuron permutation of MLP exposure (DESIGN.md §7, MLP step 2) is function-preserving:
//! the logits of a model with LoRA on q, v, fc1 and fc2 (non-zero `B`) are unchanged, within
//! f32 summation-order tolerance, after permuting the model and the adapters — for random
//! permutations and for the clustered one `expose_model` finds, on a small random model and on
//! the opt-tiny fixture. Undoing is exact; bad permutations are refused naming the layer;
//! save/load round-trips.

use lexp_runtime::checkpoint::{OptConfig, OptModel, OptWeights};
use lexp_runtime::data::{pack, text_windows, PackedBatch, SplitMix64, Tokenizer, IGNORE_INDEX};
use lexp_runtime::exposure::permutation::{expose_model, NeuronPermutation, PermutationError};
use lexp_runtime::model;
use lexp_runtime::peft::{LoraConfig, LoraParams, LoraTarget, PeftParams};
use std::path::Path;

mod common;

fn small_model() -> OptModel {
    let json = r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 64,
        "num_attention_heads": 2, "max_position_embeddings": 32}"#;
    let config = OptConfig::from_json(json, Path::new("test-config.json")).unwrap();
    let weights = OptWeights::random(&config, 11, 0.3);
    OptModel { config, weights }
}

/// LoRA on q, v, fc1, fc2 with every factor (B included) random, so each branch matters.
fn random_lora(config: &OptConfig, seed: u64, scale: f32) -> LoraParams {
    let lc = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![
            LoraTarget::Q,
            LoraTarget::V,
            LoraTarget::Fc1,
            LoraTarget::Fc2,
        ],
        use_rslora: false,
    };
    let mut lora = LoraParams::init(&lc, config, seed);
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    for (_, m) in lora.tensors_mut() {
        for v in m.data.iter_mut() {
            *v = scale * ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0);
        }
    }
    lora
}

fn random_batch(vocab: u32, lens: &[usize], seed: u64) -> PackedBatch {
    let mut rng = SplitMix64::new(seed);
    let mut b = PackedBatch {
        cu_seqlens: vec![0],
        ..Default::default()
    };
    for (s, &len) in lens.iter().enumerate() {
        for t in 0..len {
            b.input_ids.push(rng.below(u64::from(vocab)) as u32);
            b.position_ids.push(t as u32);
            b.targets.push(IGNORE_INDEX);
        }
        b.cu_seqlens.push(b.input_ids.len() as i32);
        b.examples.push(s);
    }
    b
}

fn random_permutation(layers: usize, ffn: usize, seed: u64) -> NeuronPermutation {
    let mut rng = SplitMix64::new(seed);
    let layers = (0..layers)
        .map(|_| {
            let mut p: Vec<usize> = (0..ffn).collect();
            rng.shuffle(&mut p);
            p
        })
        .collect();
    NeuronPermutation { ffn, layers }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Permutes model and adapters with `perm` and checks logits and final hidden states against
/// the unpermuted ones; returns the largest logit difference relative to the largest logit.
fn check_preserved(
    model: &OptModel,
    lora: &LoraParams,
    batch: &PackedBatch,
    perm: &NeuronPermutation,
) -> f32 {
    assert!(!perm.is_identity(), "a test permutation must move neurons");
    let params = PeftParams::from(lora.clone());
    let before = model::logits(model, Some(&params), batch).unwrap();
    let hidden_before = model::forward_exposed(
        model,
        Some(&params),
        batch,
        None,
        model::Exposure::NONE,
        false,
    )
    .unwrap();
    let (mut m2, mut l2) = (model.clone(), lora.clone());
    perm.apply_to_model(&mut m2).unwrap();
    // Permuting only the model (not the adapters) must break the function: the adapters'
    // hidden side is part of it.
    let wrong = model::logits(&m2, Some(&params), batch).unwrap();
    perm.apply_to_lora(&mut l2).unwrap();
    let l2 = PeftParams::from(l2);
    assert_ne!(
        m2.weights.layers[0].fc1.weight,
        model.weights.layers[0].fc1.weight
    );
    let after = model::logits(&m2, Some(&l2), batch).unwrap();
    let hidden_after =
        model::forward_exposed(&m2, Some(&l2), batch, None, model::Exposure::NONE, false).unwrap();
    let scale = before.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let rel = max_abs_diff(&before, &after) / scale;
    assert!(
        rel < 2e-5,
        "logits differ after permutation: {rel:e} of {scale}"
    );
    let hs = hidden_before
        .hidden
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_abs_diff(&hidden_before.hidden, &hidden_after.hidden) / hs < 2e-5);
    let wrong_rel = max_abs_diff(&before, &wrong) / scale;
    assert!(
        wrong_rel > 100.0 * rel.max(1e-6),
        "fc1/fc2 LoRA permutation had no effect ({wrong_rel:e})"
    );
    rel
}

#[test]
fn random_and_clustered_permutations_preserve_a_random_model() {
    let model = small_model();
    let lora = random_lora(&model.config, 3, 0.3);
    let batch = random_batch(50, &[7, 13, 4], 5);
    let (nl, ffn) = (model.config.num_hidden_layers, model.config.ffn_dim);
    for seed in 0..3 {
        check_preserved(&model, &lora, &batch, &random_permutation(nl, ffn, seed));
    }
    let clustered = expose_model(
        &model,
        &[batch.clone(), random_batch(50, &[20, 11], 6)],
        8,
        1,
    )
    .unwrap();
    clustered.validate().unwrap();
    check_preserved(&model, &lora, &batch, &clustered);
}

#[test]
fn clustered_permutation_preserves_opt_tiny() {
    skip_without_shared!();
    let dir = common::shared_dir().join("fixtures/opt-tiny");
    let model = OptModel::load(&dir).unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(common::shared_dir().join("data/corpus/valid.txt")).unwrap();
    let windows = text_windows(&tok, &text, 128).unwrap();
    let batches = pack(&windows, &[0, 1, 2, 3, 4, 5], 256).unwrap();
    let perm = expose_model(&model, &batches[..2], 32, 7).unwrap();
    let lora = random_lora(&model.config, 9, 0.05);
    let rel = check_preserved(&model, &lora, &batches[2], &perm);
    eprintln!("opt-tiny: clustered permutation, max logit difference {rel:e} (relative)");
    let random = random_permutation(model.config.num_hidden_layers, model.config.ffn_dim, 4);
    check_preserved(&model, &lora, &batches[2], &random);
}

#[test]
fn undo_is_exact() {
    let model = small_model();
    let lora = random_lora(&model.config, 3, 0.3);
    let perm = random_permutation(2, 64, 8);
    let mut l2 = lora.clone();
    perm.apply_to_lora(&mut l2).unwrap();
    assert_ne!(l2, lora);
    // Only the hidden side moves: q and v adapters, fc1's A and fc2's B are untouched.
    for l in 0..2 {
        for t in [LoraTarget::Q, LoraTarget::V] {
            assert_eq!(l2.get(l, t), lora.get(l, t));
        }
        assert_eq!(
            l2.get(l, LoraTarget::Fc1).unwrap().a,
            lora.get(l, LoraTarget::Fc1).unwrap().a
        );
        assert_eq!(
            l2.get(l, LoraTarget::Fc2).unwrap().b,
            lora.get(l, LoraTarget::Fc2).unwrap().b
        );
        // fc1's B row `new` is the old row perm[new].
        let (b_new, b_old) = (
            &l2.get(l, LoraTarget::Fc1).unwrap().b,
            &lora.get(l, LoraTarget::Fc1).unwrap().b,
        );
        for (new, &old) in perm.layers[l].iter().enumerate() {
            assert_eq!(b_new.row(new), b_old.row(old));
        }
    }
    perm.undo_lora(&mut l2).unwrap();
    assert_eq!(l2, lora);
    let mut m2 = model.clone();
    perm.apply_to_model(&mut m2).unwrap();
    assert_ne!(m2, model);
    perm.undo_model(&mut m2).unwrap();
    assert_eq!(m2, model);
}

#[test]
fn bad_permutations_are_refused_naming_the_layer() {
    let mut perm = NeuronPermutation::identity(3, 8);
    perm.validate().unwrap();
    perm.layers[1][3] = 5;
    let e = perm.validate().unwrap_err();
    assert!(
        matches!(e, PermutationError::NotAPermutation { layer: 1, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("layer 1"), "{e}");
    let mut short = NeuronPermutation::identity(2, 8);
    short.layers[1].pop();
    assert!(short
        .validate()
        .unwrap_err()
        .to_string()
        .contains("layer 1"));
    // Wrong layer count or ffn for the model.
    let mut model = small_model();
    assert!(NeuronPermutation::identity(3, 64)
        .apply_to_model(&mut model)
        .is_err());
    assert!(NeuronPermutation::identity(2, 32)
        .apply_to_model(&mut model)
        .is_err());
}

#[test]
fn save_and_load_round_trip() {
    let dir = std::env::temp_dir().join(format!("lexp-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("perm.json");
    let perm = random_permutation(3, 40, 2);
    perm.save(&path).unwrap();
    assert_eq!(NeuronPermutation::load(&path).unwrap(), perm);
    // A file whose order repeats a neuron is refused on load.
    let text = std::fs::read_to_string(&path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["layers"][2][0] = v["layers"][2][1].clone();
    std::fs::write(&path, v.to_string()).unwrap();
    let e = NeuronPermutation::load(&path).unwrap_err();
    assert!(e.to_string().contains("layer 2"), "{e}");
    std::fs::write(&path, "{not json").unwrap();
    assert!(matches!(
        NeuronPermutation::load(&path),
        Err(PermutationError::Read { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA gradients computed on the permuted model with permuted adapters, brought back by
/// `undo_grads`, equal the gradients on the original model (what the exposed CPU engine
/// returns to the trainer, so checkpoints and AdamW never see the permuted order).
#[test]
fn undo_grads_gives_the_original_models_gradients() {
    let model = small_model();
    let lora = random_lora(&model.config, 4, 0.3);
    let mut batch = random_batch(50, &[9, 15, 6], 8);
    // Every position predicts the next token of the packed stream (the logits tests need no
    // targets; gradients do).
    let next: Vec<i32> = batch.input_ids[1..].iter().map(|&t| t as i32).collect();
    batch.targets[..next.len()].copy_from_slice(&next);
    let (nl, ffn) = (model.config.num_hidden_layers, model.config.ffn_dim);
    let perm = random_permutation(nl, ffn, 5);
    let want = model::loss_and_grads(&model, &lora.clone().into(), &batch, 0.1, None).unwrap();
    let (mut pm, mut pl) = (model.clone(), lora.clone());
    perm.apply_to_model(&mut pm).unwrap();
    perm.apply_to_lora(&mut pl).unwrap();
    let mut got = model::loss_and_grads(&pm, &pl.into(), &batch, 0.1, None).unwrap();
    // Before the undo the fc1/fc2 gradients are in the permuted order: they differ.
    let fc1 = |g: &model::PeftGrads| g.get(0, LoraTarget::Fc1).unwrap().1.to_vec();
    let (before, reference) = (fc1(&got.grads), fc1(&want.grads));
    let peak = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&before, &reference);
    assert!(peak > 0.0 && d > 0.1 * peak, "peak {peak} diff {d}");
    perm.undo_grads(&mut got.grads).unwrap();
    assert!((got.loss_sum - want.loss_sum).abs() < 1e-4 * want.loss_sum.abs());
    for (g, w) in got.grads.flat().iter().zip(want.grads.flat()) {
        let peak = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            peak > 0.0 && max_abs_diff(g, w) <= 1e-4 * peak,
            "{g:?} vs {w:?}"
        );
    }
}
