//! `lexp finetune --exposure attention` end to end on the CPU engine (DESIGN.md §7, attention),
//! on plain-text training data (`--text-windows`): the bundled opt-tiny on a text made of the
//! bundled E2E completions, predictors trained offline, a few block-sparse steps with dense
//! probes; the run computes fewer than all causal key blocks, logs the probes' per-layer recall,
//! density and gap, and reports dense and sparse eval losses. The CLI refuses the GPU engine
//! (naming `--device cpu`) and bad attention or text-window settings.

use lexp_runtime::data::{text_windows, Tokenizer};
use lexp_runtime::train::{
    self, AttentionExposureConfig, ExposureConfig, ExposureMode, Silent, TrainConfig,
};
use serde_json::Value;
use std::path::{Path, PathBuf};

const LEXP: &str = env!("CARGO_BIN_EXE_lexp");

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

/// A plain-text corpus: the E2E completions, one document each (blank-line separated).
fn text_file(name: &str) -> PathBuf {
    let jsonl = std::fs::read_to_string(assets().join("e2e/train.jsonl")).unwrap();
    let docs: Vec<String> = jsonl
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["completion"].as_str().unwrap().to_string()
        })
        .collect();
    let path = std::env::temp_dir().join(format!("lexp-attn-ft-{name}-{}.txt", std::process::id()));
    std::fs::write(&path, docs.join("\n\n")).unwrap();
    path
}

fn config(text: &Path) -> TrainConfig {
    TrainConfig {
        model_dir: assets().join("opt-tiny"),
        train_files: vec![text.to_path_buf()],
        eval_fraction: 0.2,
        eval_max_examples: 4,
        text_windows: Some(512),
        max_seq_len: 512,
        micro_batch_tokens: 1024,
        examples_per_step: 2,
        max_steps: 6,
        lr: 2e-3,
        exposure: ExposureConfig {
            mode: ExposureMode::Attention,
            probe_every: 2,
            predictor_batches: 4,
            predictor_steps: 200,
            attention: AttentionExposureConfig {
                target: 0.8,
                q_block: 32,
                k_block: 32,
                ..AttentionExposureConfig::default()
            },
            ..ExposureConfig::default()
        },
        ..TrainConfig::default()
    }
}

#[test]
fn text_windows_train_on_the_head_and_hold_out_the_tail() {
    let text = text_file("split");
    let config = config(&text);
    let model = config.load_model().unwrap();
    let data = train::trainer::load_data(&config, &model).unwrap();
    // Independently: the file's windows, the last fifth held out (before the eval cap).
    let tok = Tokenizer::from_file(assets().join("opt-tiny/tokenizer.json")).unwrap();
    let all = text_windows(&tok, &std::fs::read_to_string(&text).unwrap(), 512).unwrap();
    let held = (all.len() as f64 * 0.2).round() as usize;
    assert!(all.len() > 20 && held > 4, "{} windows", all.len());
    assert_eq!(data.train, all[..all.len() - held]);
    assert_eq!(data.eval, all[all.len() - held..all.len() - held + 4]);
    assert!(data
        .train
        .iter()
        .all(|e| e.ids.len() == 512 && e.loss_mask.iter().all(|&m| m)));
    // Windows longer than the model's positions are refused, naming them.
    let mut long = config.clone();
    long.text_windows = Some(2048);
    long.max_seq_len = 2048;
    let err = train::trainer::load_data(&long, &model).err().unwrap();
    assert!(err.to_string().contains("1024 positions"), "{err}");
    std::fs::remove_file(&text).unwrap();
}

#[test]
fn a_short_attention_run_computes_fewer_blocks_and_logs_probes() {
    let text = text_file("run");
    let out = std::env::temp_dir().join(format!("lexp-attn-ft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let config = config(&text);
    let mut calls = 0;
    let mut engine = train::exposed::cpu_engine_exposed(&config, &mut |_, _| calls += 1).unwrap();
    assert_eq!(calls, config.exposure.predictor_batches + 1);
    assert!(engine.exposure().unwrap().attention.is_some());
    let summary = train::run(&config, &out, false, &mut engine, &mut Silent).unwrap();

    assert!(summary.exposure.is_none(), "no MLP exposure");
    let a = summary.attention.as_ref().expect("an attention summary");
    assert_eq!(a.layers.len(), 4);
    assert_eq!(a.probes, 3);
    assert!(a.density > 0.0 && a.density < 1.0, "{a:?}");
    for (l, layer) in a.layers.iter().enumerate() {
        assert!(
            layer.density > 0.0 && layer.density < 1.0,
            "layer {l}: {layer:?}"
        );
        let r = layer.recall.unwrap();
        assert!(r > 0.5 && r <= 1.0 + 1e-9, "layer {l}: {layer:?}");
    }

    let records: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let probes: Vec<&Value> = records.iter().filter(|r| r["kind"] == "probe").collect();
    assert_eq!(probes.len(), 3);
    let mut recalls = vec![0.0; 4];
    for p in &probes {
        let (dense, sparse, gap) = (
            p["dense_loss"].as_f64().unwrap(),
            p["sparse_loss"].as_f64().unwrap(),
            p["gap"].as_f64().unwrap(),
        );
        assert!(dense.is_finite() && sparse.is_finite());
        assert!((gap - (sparse - dense) / dense).abs() < 1e-9);
        let layers = p["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 4);
        for (l, x) in layers.iter().enumerate() {
            let (d, r) = (
                x["density"].as_f64().unwrap(),
                x["recall"].as_f64().unwrap(),
            );
            assert!(d > 0.0 && d < 1.0 && r > 0.0 && r <= 1.0 + 1e-9, "{x}");
            recalls[l] += r / 3.0;
        }
        assert_eq!(p["refresh_loss"].as_array().unwrap().len(), 4);
    }
    for (l, layer) in a.layers.iter().enumerate() {
        assert!((layer.recall.unwrap() - recalls[l]).abs() < 1e-9);
    }
    let evals: Vec<&Value> = records.iter().filter(|r| r["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    let dense_end = summary.eval_loss_end_dense.unwrap();
    assert!(dense_end.is_finite() && summary.eval_loss_end.is_finite());
    assert_eq!(evals[1]["dense_loss"].as_f64().unwrap(), dense_end);
    assert_eq!(evals[1]["loss"].as_f64().unwrap(), summary.eval_loss_end);
    // Sparse and dense evals differ: the eval ran the masks.
    assert!(summary.eval_loss_end != dense_end);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(json["attention"]["density"].as_f64().unwrap() < 1.0);
    std::fs::remove_dir_all(&out).unwrap();
    std::fs::remove_file(&text).unwrap();
}

fn lexp_err(args: &[&str]) -> String {
    let out = std::env::temp_dir().join(format!("lexp-attn-cli-{}", std::process::id()));
    let output = std::process::Command::new(LEXP)
        .arg("finetune")
        .args(args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} succeeded");
    assert!(!out.join("metrics.jsonl").exists());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_cli_refuses_the_gpu_and_bad_attention_or_window_settings() {
    let err = lexp_err(&[
        "--exposure",
        "attention",
        "--device",
        "cuda",
        "--max-steps",
        "1",
    ]);
    assert!(
        err.contains("--device cpu") && err.contains("attention"),
        "{err}"
    );
    let err = lexp_err(&["--exposure", "attention", "--attn-target", "1.5"]);
    assert!(err.contains("--attn-target 1.5"), "{err}");
    let err = lexp_err(&["--exposure", "attention", "--attn-budget", "0"]);
    assert!(err.contains("--attn-budget 0"), "{err}");
    let err = lexp_err(&["--exposure", "attention", "--attn-rank", "0"]);
    assert!(err.contains("--attn-rank"), "{err}");
    let err = lexp_err(&["--exposure", "attention", "--attn-block", "0"]);
    assert!(err.contains("--attn-block"), "{err}");
    let err = lexp_err(&["--text-windows", "256"]);
    assert!(err.contains("--data"), "{err}");
    let model = assets().join("opt-tiny");
    let model = model.to_str().unwrap();
    let text = text_file("cli");
    let data = text.to_str().unwrap();
    let err = lexp_err(&["--model", model, "--data", data, "--text-windows", "0"]);
    assert!(err.contains("--text-windows"), "{err}");
    let err = lexp_err(&["--model", model, "--data", data, "--text-windows", "2048"]);
    assert!(err.contains("--max-positions"), "{err}");
    let err = lexp_err(&[
        "--model",
        model,
        "--data",
        data,
        "--text-windows",
        "512",
        "--max-seq-len",
        "256",
    ]);
    assert!(err.contains("--max-seq-len 256"), "{err}");
    std::fs::remove_file(&text).unwrap();
}
