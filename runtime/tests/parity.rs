//! Parity with PyTorch + transformers + PEFT (RUNTIME.md §7): our CPU forward and LoRA
//! gradients against the f32 references in `tests/parity/*.json`, produced on the GPU machine
//! by `bench/parity/opt_reference.py` (see `bench/parity/README.md`).
//!
//! opt-tiny is bundled in `assets/default/opt-tiny`, so its test always runs; opt-mini needs
//! `../shared/fixtures` and is skipped without it (a failure with `LEXP_REQUIRE_SHARED=1`).

use lexp_runtime::checkpoint::{HostMatrix, OptModel};
use lexp_runtime::data::{PackedBatch, Tokenizer, IGNORE_INDEX};
use lexp_runtime::model;
use lexp_runtime::peft::{LoraConfig, LoraModule, LoraParams, LoraTarget};
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn reference(name: &str) -> Value {
    let path = repo().join(format!("runtime/tests/parity/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The bundled copy of a fixture (opt-tiny is in `assets/`), else the one in `../shared`;
/// `None` (skip) when neither is here.
fn model_dir(name: &str) -> Option<PathBuf> {
    let bundled = repo().join("assets/default").join(name);
    if bundled.join("config.json").exists() {
        return Some(bundled);
    }
    if !common::shared_available() {
        return None;
    }
    Some(common::shared_dir().join("fixtures").join(name))
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn matrix(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().flat_map(floats).collect()
}

/// The packed batch of the reference: ids, restarted positions, HF-shifted targets.
fn batch(r: &Value) -> PackedBatch {
    let input = &r["input"];
    let ids: Vec<u32> = ints(&input["input_ids"])
        .iter()
        .map(|&x| x as u32)
        .collect();
    let labels = ints(&input["labels"]);
    let cu: Vec<i32> = ints(&input["cu_seqlens"])
        .iter()
        .map(|&x| x as i32)
        .collect();
    let positions: Vec<u32> = ints(&input["positions"])
        .iter()
        .map(|&x| x as u32)
        .collect();
    let mut targets = vec![IGNORE_INDEX; ids.len()];
    for w in cu.windows(2) {
        for t in w[0] as usize..(w[1] as usize - 1) {
            if labels[t + 1] != -100 {
                targets[t] = labels[t + 1] as i32;
            }
        }
    }
    PackedBatch {
        input_ids: ids,
        position_ids: positions,
        targets,
        cu_seqlens: cu,
        examples: (0..3).collect(),
    }
}

/// The closed-form LoRA values of the reference (`lora_init`).
fn lora_value(layer: usize, target: usize, m: usize, i: usize, j: usize) -> f32 {
    let x = 0.37 * i as f64
        + 0.91 * j as f64
        + 1.3 * layer as f64
        + 0.7 * target as f64
        + 2.1 * m as f64
        + 0.5;
    (0.05 * x.sin()) as f32
}

fn reference_lora(model: &OptModel) -> LoraParams {
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec![LoraTarget::Q, LoraTarget::V],
        use_rslora: false,
    };
    let mut p = LoraParams::init(&config, &model.config, 0);
    for layer in 0..model.config.num_hidden_layers {
        for t in [LoraTarget::Q, LoraTarget::V] {
            let ti = t.index();
            let m: &mut LoraModule = p.get_mut(layer, t).unwrap();
            let fill = |mat: &mut HostMatrix, which: usize| {
                for i in 0..mat.rows {
                    for j in 0..mat.cols {
                        mat.data[i * mat.cols + j] = lora_value(layer, ti, which, i, j);
                    }
                }
            };
            fill(&mut m.a, 0);
            fill(&mut m.b, 1);
        }
    }
    p
}

fn rel_frobenius(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
}

fn check_model(name: &str) {
    let Some(dir) = model_dir(name) else { return };
    let r = reference(name);
    let model = OptModel::load(&dir).unwrap();
    let b = batch(&r);
    let v = model.config.vocab_size;

    // Our tokenization of the three examples gives the reference's sequences.
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for (ex, seq) in r["data"]["examples"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r["input"]["sequences"].as_array().unwrap())
    {
        let mut ids = tok.encode(ex["prompt"].as_str().unwrap(), true).unwrap();
        ids.extend(
            tok.encode(ex["completion"].as_str().unwrap(), false)
                .unwrap(),
        );
        ids.push(2);
        let want: Vec<u32> = ints(seq).iter().map(|&x| x as u32).collect();
        assert_eq!(ids, want, "{name}: tokenization");
    }

    // Forward, f32: per-row logsumexp, selected logits, loss.
    let logits = model::logits(&model, None, &b).unwrap();
    let fwd = &r["forward"];
    let want_lse = floats(&fwd["row_logsumexp"]);
    let mut worst = 0.0f64;
    for (t, &w) in want_lse.iter().enumerate() {
        worst = worst.max((logsumexp(&logits[t * v..(t + 1) * v]) - w).abs());
    }
    assert!(worst <= 1e-4, "{name}: row logsumexp differs by {worst}");
    let mut worst_logit = 0.0f64;
    for row in fwd["selected_rows"].as_array().unwrap() {
        let t = row["row"].as_u64().unwrap() as usize;
        for (c, w) in floats(&row["logits_first64"]).iter().enumerate() {
            worst_logit = worst_logit.max((logits[t * v + c] as f64 - w).abs());
        }
        let argmax = (0..v)
            .max_by(|&a, &b| logits[t * v + a].total_cmp(&logits[t * v + b]))
            .unwrap();
        assert_eq!(
            argmax as u64,
            row["argmax"].as_u64().unwrap(),
            "{name}: argmax of row {t}"
        );
    }
    assert!(
        worst_logit <= 1e-4,
        "{name}: logits differ by {worst_logit}"
    );
    let (sum, count) = model::eval_loss(&model, None, &b).unwrap();
    assert_eq!(count as u64, fwd["num_targets"].as_u64().unwrap());
    let loss = sum / count as f64;
    let want = fwd["loss"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() <= 1e-5,
        "{name}: loss {loss} vs {want}"
    );

    // One LoRA step: loss and the gradients of A and B.
    let lora = reference_lora(&model);
    let lr = &r["lora"];
    let n = lr["num_targets"].as_u64().unwrap() as f32;
    let out = model::loss_and_grads(&model, &lora.clone().into(), &b, 1.0 / n, None).unwrap();
    let lora_loss = out.loss_sum / out.count as f64;
    let want = lr["loss"].as_f64().unwrap();
    assert!(
        ((lora_loss - want) / want).abs() <= 1e-5,
        "{name}: LoRA loss {lora_loss} vs {want}"
    );
    let mut worst_grad = 0.0f64;
    for g in lr["grads"].as_array().unwrap() {
        let layer = g["layer"].as_u64().unwrap() as usize;
        let t = LoraTarget::from_name(g["target"].as_str().unwrap()).unwrap();
        let (da, db) = out.grads.get(layer, t).unwrap();
        let ea = rel_frobenius(da, &matrix(&g["dA"]));
        let eb = rel_frobenius(db, &matrix(&g["dB"]));
        worst_grad = worst_grad.max(ea).max(eb);
        assert!(
            ea <= 1e-4 && eb <= 1e-4,
            "{name}: layer {layer} {t:?}: dA rel {ea:e}, dB rel {eb:e}"
        );
    }
    for g in lr["grad_norms"].as_array().unwrap() {
        let layer = g["layer"].as_u64().unwrap() as usize;
        let t = LoraTarget::from_name(g["target"].as_str().unwrap()).unwrap();
        let (da, db) = out.grads.get(layer, t).unwrap();
        let norm = |x: &[f32]| x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        for (got, key) in [(norm(da), "dA_norm"), (norm(db), "dB_norm")] {
            let want = g[key].as_f64().unwrap();
            assert!(
                ((got - want) / want).abs() <= 1e-4,
                "{name}: layer {layer} {t:?} {key}: {got} vs {want}"
            );
        }
    }
    eprintln!(
        "{name}: loss {loss:.6} (ref {:.6}), lse max err {worst:.2e}, logit max err {worst_logit:.2e}, \
         LoRA loss {lora_loss:.6} (ref {:.6}), LoRA grad max rel-Frobenius err {worst_grad:.2e}",
        fwd["loss"], lr["loss"]
    );
}

#[test]
fn opt_tiny_matches_transformers_and_peft() {
    check_model("opt-tiny");
}

#[test]
fn opt_mini_matches_transformers_and_peft() {
    check_model("opt-mini");
}
