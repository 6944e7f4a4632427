//! BitFit and Houlsby adapters (RUNTIME.md §2.7, §2.8) next to LoRA: their hand-written
//! gradients against finite differences, their files, and `lexp merge`'s checkpoint.

mod common;

use lexp_runtime::checkpoint::{Dtype, OptConfig, OptModel, OptWeights, SafeTensors, WriteTensor};
use lexp_runtime::data::{PackedBatch, SplitMix64, IGNORE_INDEX};
use lexp_runtime::model::{self, DropoutRng, MaskSource};
use lexp_runtime::peft::merge::{merge, MERGED_WEIGHTS_FILE};
use lexp_runtime::peft::{
    AdapterActivation, BitFitConfig, HoulsbyConfig, LoraConfig, LoraTarget, PeftConfig, PeftError,
    PeftParams,
};
use std::path::{Path, PathBuf};

fn config(extra: &str) -> OptConfig {
    let json = format!(
        r#"{{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "ffn_dim": 32,
            "num_attention_heads": 2, "max_position_embeddings": 16 {extra}}}"#
    );
    OptConfig::from_json(&json, Path::new("test-config.json")).unwrap()
}

fn batch(vocab: u64) -> PackedBatch {
    let mut rng = SplitMix64::new(3);
    let mut b = PackedBatch {
        cu_seqlens: vec![0],
        ..Default::default()
    };
    for (s, len) in [6usize, 9].into_iter().enumerate() {
        let ids: Vec<u32> = (0..len).map(|_| rng.below(vocab) as u32).collect();
        for t in 0..len {
            b.input_ids.push(ids[t]);
            b.position_ids.push(t as u32);
            b.targets.push(if t + 1 < len {
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

/// LoRA on q and fc2, BitFit (LayerNorm βs included), Houlsby adapters with `act`: every
/// tensor filled with small random values (the adapters' `up` included, so no gradient is
/// trivially zero).
fn all_methods(model: &OptModel, act: AdapterActivation, seed: u64) -> PeftParams {
    let config = PeftConfig {
        lora: Some(LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.1,
            targets: vec![LoraTarget::Q, LoraTarget::Fc2],
            use_rslora: false,
        }),
        bitfit: Some(BitFitConfig { layer_norms: true }),
        houlsby: Some(HoulsbyConfig {
            bottleneck: 4,
            activation: act,
        }),
    };
    let mut p = PeftParams::init(&config, model, seed).unwrap();
    let mut rng = SplitMix64::new(seed ^ 0x5eed);
    for (_, m) in p.tensors_mut() {
        for v in &mut m.data {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            *v += 0.3 * (2.0 * u - 1.0);
        }
    }
    p
}

/// Each trainable tensor's derivative along its analytic gradient's unit direction (central
/// differences of the f32 forward, same dropout masks, median of three steps) must be the
/// gradient's norm within 1%.
fn check_gradients(name: &str, config: OptConfig, act: AdapterActivation) {
    let model = OptModel {
        weights: OptWeights::random(&config, 11, 0.3),
        config,
    };
    let params = all_methods(&model, act, 5);
    let b = batch(model.config.vocab_size as u64);
    let n = b.num_targets() as f32;
    let rng = DropoutRng { seed: 77 };
    let drop = Some(&rng as &dyn MaskSource);
    let out = model::loss_and_grads_with_masks(&model, &params, &b, 1.0 / n, drop).unwrap();
    let grads = out.grads.flat();
    let names: Vec<String> = params.tensors().into_iter().map(|(k, _)| k).collect();
    assert_eq!(grads.len(), names.len(), "{name}: one gradient per tensor");
    for ((k, m), g) in params.tensors().into_iter().zip(&grads) {
        assert_eq!(m.data.len(), g.len(), "{name}: {k}");
    }
    let loss = |p: &PeftParams| {
        let fwd = model::forward_with_masks(&model, Some(p), &b, drop, false).unwrap();
        model::opt::head_loss(&model, &fwd, &b.targets, None)
            .unwrap()
            .loss_sum
            / f64::from(n)
    };
    let mut worst = 0.0f64;
    for (i, g) in grads.iter().enumerate() {
        let norm = g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt();
        if names[i].ends_with("k_proj.bias") {
            // A key bias adds `q·b` to every score of a query row: softmax ignores it, so its
            // gradient is zero up to rounding (and finite differences measure only noise).
            assert!(norm < 1e-6, "{name}: {}: gradient norm {norm:e}", names[i]);
            continue;
        }
        assert!(norm > 0.0, "{name}: {} has a zero gradient", names[i]);
        let dir: Vec<f32> = g.iter().map(|&v| (f64::from(v) / norm) as f32).collect();
        let derivative = |eps: f32| {
            let shifted = |sign: f32| {
                let mut p = params.clone();
                let mut ts = p.tensors_mut();
                ts[i]
                    .1
                    .data
                    .iter_mut()
                    .zip(&dir)
                    .for_each(|(v, d)| *v += sign * eps * d);
                loss(&p)
            };
            (shifted(1.0) - shifted(-1.0)) / (2.0 * f64::from(eps))
        };
        // The closest of three step sizes: a step that crosses a ReLU kink (of the MLP or of
        // a ReLU adapter) is off, a wrong gradient is off at every step.
        let fd = [derivative(3e-3), derivative(1e-3), derivative(3e-4)];
        let err = fd
            .iter()
            .map(|d| (d - norm).abs() / norm)
            .fold(f64::INFINITY, f64::min);
        worst = worst.max(err);
        assert!(
            err < 1e-2,
            "{name}: {}: gradient norm {norm:.6e}, finite differences along it {fd:?}",
            names[i]
        );
    }
    eprintln!(
        "{name}: {} tensors, worst relative error of the directional derivatives {worst:.2e}",
        names.len()
    );
}

#[test]
fn bitfit_and_houlsby_gradients_pre_ln_relu_with_dropout() {
    let mut c = config("");
    c.dropout = 0.1;
    check_gradients("pre-LN, ReLU adapters", c, AdapterActivation::Relu);
}

#[test]
fn bitfit_and_houlsby_gradients_post_ln_gelu_with_projections() {
    let c = config(r#", "do_layer_norm_before": false, "word_embed_proj_dim": 8"#);
    check_gradients(
        "post-LN + project_in/out, GELU adapters",
        c,
        AdapterActivation::Gelu,
    );
}

#[test]
fn bitfit_refuses_a_model_without_biases() {
    let c = config(r#", "enable_bias": false"#);
    let model = OptModel {
        weights: OptWeights::random(&c, 1, 0.1),
        config: c,
    };
    let config = PeftConfig {
        bitfit: Some(BitFitConfig::default()),
        ..Default::default()
    };
    let err = PeftParams::init(&config, &model, 0).unwrap_err();
    assert!(err.to_string().contains("enable_bias"), "{err}");
    let none = PeftParams::init(&PeftConfig::default(), &model, 0).unwrap_err();
    assert!(none.to_string().contains("no PEFT method"), "{none}");

    // A trained bias of the wrong length is refused before any op, naming it.
    let c = self::config("");
    let model = OptModel {
        weights: OptWeights::random(&c, 1, 0.1),
        config: c,
    };
    let mut p = PeftParams::init(&config, &model, 0).unwrap();
    let fc1 = &mut p.bitfit.as_mut().unwrap().layers[1][4];
    fc1.as_mut().unwrap().data.pop();
    fc1.as_mut().unwrap().cols -= 1;
    let b = batch(model.config.vocab_size as u64);
    let err = model::loss_and_grads(&model, &p, &b, 1.0, None)
        .err()
        .expect("a short fc1 bias was accepted");
    assert!(err.to_string().contains("layers.1.fc1.bias"), "{err}");
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lexp-peft-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn every_method_round_trips_through_its_files_and_bad_files_are_named() {
    let c = config("");
    let model = OptModel {
        weights: OptWeights::random(&c, 2, 0.2),
        config: c,
    };
    let params = all_methods(&model, AdapterActivation::Gelu, 9);
    let dir = temp("files");
    params.save(&dir, "base").unwrap();
    let back = PeftParams::load(&dir, &model).unwrap();
    assert_eq!(back, params);
    assert!(back.lora.is_some() && back.bitfit.is_some() && back.houlsby.is_some());

    // A Houlsby config whose bottleneck disagrees with the file's tensors.
    let bad = temp("files-bad");
    let mut other = params.clone();
    other.lora = None;
    other.bitfit = None;
    other.save(&bad, "base").unwrap();
    let cfg = bad.join("houlsby_config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\"bottleneck\": 4"), "{text}");
    std::fs::write(&cfg, text.replace("\"bottleneck\": 4", "\"bottleneck\": 3")).unwrap();
    let err = PeftParams::load(&bad, &model).unwrap_err();
    assert!(
        matches!(err, PeftError::ShapeMismatch { ref tensor, .. } if tensor.contains("attn_adapter.down.weight")),
        "{err}"
    );
    assert!(
        err.to_string().contains("houlsby_model.safetensors"),
        "{err}"
    );

    // A config of another type under BitFit's name.
    std::fs::copy(&cfg, bad.join("bitfit_config.json")).unwrap();
    let err = PeftParams::load(&bad, &model).unwrap_err();
    assert!(
        err.to_string()
            .contains("bitfit_model.safetensors: no such file"),
        "{err}"
    );
    let weights = bad.join("houlsby_model.safetensors");
    std::fs::copy(weights, bad.join("bitfit_model.safetensors")).unwrap();
    let err = PeftParams::load(&bad, &model).unwrap_err();
    assert!(
        err.to_string().contains("bitfit_config.json") && err.to_string().contains("peft_type"),
        "{err}"
    );

    // An empty directory holds no adapter.
    let empty = temp("files-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = PeftParams::load(&empty, &model).unwrap_err();
    assert!(err.to_string().contains("no adapter"), "{err}");
    for d in [dir, bad, empty] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A copy of the checkpoint in `from` with every tensor stored as F32.
fn as_f32(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let st = SafeTensors::open(from.join("model.safetensors")).unwrap();
    let tensors: Vec<WriteTensor<'_>> = st
        .tensors()
        .map(|v| {
            WriteTensor::from_f32(
                v.name(),
                v.shape().to_vec(),
                &v.to_f32().unwrap(),
                Dtype::F32,
            )
            .unwrap()
        })
        .collect();
    lexp_runtime::checkpoint::writer::write(
        to.join("model.safetensors"),
        &tensors,
        &Default::default(),
    )
    .unwrap();
}

/// The bundled opt-tiny converted to F32: LoRA on all six projections and BitFit merged into
/// it give the logits of the base model with the adapter (f32 rounding only); merged into the
/// F16 original, the tensors stay F16 and the logits agree to F16 rounding. A Houlsby adapter
/// is refused, and nothing is overwritten.
#[test]
fn merged_checkpoint_equals_base_plus_adapter() {
    let f16_base = common::gpu::assets().join("opt-tiny");
    let base = temp("base-f32");
    as_f32(&f16_base, &base);
    let model = OptModel::load(&base).unwrap();
    let config = PeftConfig {
        lora: Some(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
            use_rslora: false,
        }),
        bitfit: Some(BitFitConfig::default()),
        houlsby: None,
    };
    let mut params = PeftParams::init(&config, &model, 3).unwrap();
    let mut rng = SplitMix64::new(4);
    for (_, m) in params.tensors_mut() {
        for v in &mut m.data {
            let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            *v += 0.05 * (2.0 * u - 1.0);
        }
    }
    let out = temp("merged");
    let report = merge(&base, &model, &params, &out).unwrap();
    let layers = model.config.num_hidden_layers;
    assert_eq!(report.lora_weights, 6 * layers);
    assert_eq!(report.biases, 8 * layers + 1);
    assert!(report.copied_files.contains(&"config.json".to_string()));
    assert!(out.join(MERGED_WEIGHTS_FILE).is_file() && out.join("tokenizer.json").is_file());

    let merged = OptModel::load(&out).unwrap();
    let b = batch(model.config.vocab_size as u64);
    let want = model::logits(&model, Some(&params), &b).unwrap();
    let got = model::logits(&merged, None, &b).unwrap();
    let plain = model::logits(&model, None, &b).unwrap();
    let diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
    };
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        diff(&got, &want) < 1e-4 * scale,
        "merged vs base + adapter: {}",
        diff(&got, &want)
    );
    assert!(
        diff(&plain, &want) > 1e-2 * scale,
        "the adapter changes nothing"
    );

    // Into the F16 checkpoint: the same dtype out, logits within F16's rounding of weights.
    let out16 = temp("merged-f16");
    merge(&f16_base, &model, &params, &out16).unwrap();
    let st = SafeTensors::open(out16.join(MERGED_WEIGHTS_FILE)).unwrap();
    assert!(st.tensors().all(|v| v.dtype() == Dtype::F16));
    let got16 = model::logits(&OptModel::load(&out16).unwrap(), None, &b).unwrap();
    assert!(
        diff(&got16, &want) < 1e-2 * scale,
        "F16 merge: {} of {scale}",
        diff(&got16, &want)
    );

    // Nothing is overwritten, and Houlsby adapters cannot be merged.
    let again = merge(&base, &model, &params, &out).unwrap_err();
    assert!(matches!(again, PeftError::OutputExists { .. }), "{again}");
    let houlsby = PeftParams::init(
        &PeftConfig {
            houlsby: Some(HoulsbyConfig::default()),
            ..Default::default()
        },
        &model,
        0,
    )
    .unwrap();
    let out2 = temp("merged-houlsby");
    let err = merge(&base, &model, &houlsby, &out2).unwrap_err();
    assert!(matches!(err, PeftError::NotMergeable { .. }), "{err}");
    assert!(!out2.exists(), "a refused merge wrote {}", out2.display());
    for d in [out, out16, base] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// BitFit + Houlsby through the trainer on opt-tiny: a run stopped after 2 of 4 steps and
/// resumed from its checkpoint ends with the uninterrupted run's parameters (every method's
/// files and AdamW's state come back), and a resume under other PEFT settings is refused.
#[test]
fn bitfit_and_houlsby_runs_resume_exactly() {
    use lexp_runtime::train::{self, CpuEngine, TrainConfig, TrainError};
    let assets = common::gpu::assets();
    let config = TrainConfig {
        model_dir: assets.join("opt-tiny"),
        train_files: vec![assets.join("e2e/train.jsonl")],
        eval_file: Some(assets.join("e2e/eval.jsonl")),
        eval_max_examples: 16,
        peft: vec!["bitfit".into(), "houlsby".into()],
        adapter_bottleneck: 8,
        examples_per_step: 4,
        max_steps: 4,
        save_every: 2,
        lr: 1e-3,
        ..TrainConfig::default()
    };
    let engine = || CpuEngine::new(config.load_model().unwrap());
    let whole = temp("run-whole");
    train::run(
        &config,
        &whole,
        false,
        &mut engine(),
        &mut train::trainer::Silent,
    )
    .unwrap();
    let cut = temp("run-cut");
    let mut stop = common::StopAfter { after: 2, steps: 0 };
    let err = train::run(&config, &cut, false, &mut engine(), &mut stop).unwrap_err();
    assert!(
        matches!(err, TrainError::Interrupted { step: 2, .. }),
        "{err}"
    );
    train::run(
        &config,
        &cut,
        true,
        &mut engine(),
        &mut train::trainer::Silent,
    )
    .unwrap();
    let model = config.load_model().unwrap();
    let adapter = train::trainer::ADAPTER;
    let a = PeftParams::load(&whole.join(adapter), &model).unwrap();
    let b = PeftParams::load(&cut.join(adapter), &model).unwrap();
    assert!(a.bitfit.is_some() && a.houlsby.is_some() && a.lora.is_none());
    assert_eq!(a, b, "the resumed run ended elsewhere");
    let init = PeftParams::init(&config.peft_config().unwrap(), &model, config.seed).unwrap();
    assert_ne!(a, init, "training changed nothing");

    let other = TrainConfig {
        adapter_bottleneck: 4,
        ..config.clone()
    };
    let err = train::run(
        &other,
        &cut,
        true,
        &mut engine(),
        &mut train::trainer::Silent,
    )
    .unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
    for d in [whole, cut] {
        let _ = std::fs::remove_dir_all(d);
    }
}
