//! Seed corpora of the fuzz targets: valid inputs built from scratch and from the bundled
//! assets (`assets/default/opt-tiny`, `assets/default/e2e`). Each entry is one list of parts,
//! one per file of the target's input.

use super::targets::{self, Fixtures, SHARDS};
use lexp_runtime::checkpoint::{writer, Dtype, SafeTensors, WriteTensor};
use lexp_runtime::peft::{save_adapter, LoraConfig, LoraParams, LoraTarget};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The bundled assets, `assets/default`.
pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

/// The fixtures the targets share ([`Fixtures::bundled`]).
pub fn fixtures() -> &'static Fixtures {
    Fixtures::bundled()
}

/// A file under `assets/default`.
pub fn read(rel: &str) -> Vec<u8> {
    let path = assets().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor of `dtype` and `shape` with deterministic bytes (any bit pattern is valid).
pub fn tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u8) -> WriteTensor<'static> {
    let n: usize = shape.iter().product();
    let bytes = (n * dtype.bits()).div_ceil(8);
    WriteTensor {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        bytes: Cow::Owned(
            (0..bytes)
                .map(|i| (i as u8).wrapping_mul(37) ^ seed)
                .collect(),
        ),
    }
}

/// The safetensors file the writer makes of `tensors` and `metadata`.
pub fn file(tensors: &[WriteTensor<'_>], metadata: &[(&str, &str)]) -> Vec<u8> {
    let meta: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    writer::to_bytes(tensors, &meta).expect("valid tensors")
}

/// Small valid safetensors files: mixed dtypes with metadata, every dtype, no tensors, a
/// scalar and an empty tensor, the tiny model, and the 7 MB opt-tiny fixture.
pub fn safetensors_corpus() -> Vec<Vec<Vec<u8>>> {
    let mixed = file(
        &[
            tensor("w", Dtype::F32, &[2, 3], 1),
            tensor("h", Dtype::F16, &[4], 2),
            tensor("b", Dtype::BF16, &[2, 2], 3),
            tensor("e", Dtype::I64, &[0, 3], 4),
            tensor("s", Dtype::U8, &[], 5),
        ],
        &[("note", "fuzz seed")],
    );
    let every: Vec<WriteTensor<'static>> = Dtype::ALL
        .iter()
        .enumerate()
        .map(|(i, &d)| tensor(&format!("t{i}"), d, &[2, 4], i as u8))
        .collect();
    let mut hand = b"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}".to_vec();
    let mut hand_file = (hand.len() as u64).to_le_bytes().to_vec();
    hand_file.append(&mut hand);
    hand_file.extend_from_slice(&1.5f32.to_le_bytes());
    vec![
        vec![mixed],
        vec![file(&every, &[])],
        vec![file(&[], &[])],
        vec![hand_file],
        vec![targets::tiny_weights(&fixtures().tiny)],
        vec![read("opt-tiny/model.safetensors")],
    ]
}

/// An index over the tiny model's weights split into two shards, and one with a single shard.
pub fn sharded_corpus() -> Vec<Vec<Vec<u8>>> {
    let all = SafeTensors::from_bytes("tiny", targets::tiny_weights(&fixtures().tiny)).unwrap();
    let names: Vec<&str> = all.names().collect();
    let half = names.len() / 2;
    let shard = |names: &[&str]| {
        let ts: Vec<WriteTensor<'_>> = names
            .iter()
            .map(|n| WriteTensor::from(all.get(n).unwrap()))
            .collect();
        file(&ts, &[])
    };
    let index = |split: usize| {
        let map: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("\"{n}\": \"{}\"", SHARDS[usize::from(i >= split)]))
            .collect();
        format!(
            "{{\"metadata\": {{\"total_size\": 1234}}, \"weight_map\": {{\n{}\n}}}}",
            map.join(",\n")
        )
    };
    vec![
        vec![
            index(half).into_bytes(),
            shard(&names[..half]),
            shard(&names[half..]),
        ],
        vec![index(names.len()).into_bytes(), shard(&names), Vec::new()],
    ]
}

/// opt-tiny's `config.json`, the tiny model's, an empty object (all defaults: opt-125m) and
/// variants with post-LN, projections, untied heads, no biases and other activations.
pub fn config_corpus() -> Vec<Vec<Vec<u8>>> {
    [
        String::from_utf8(read("opt-tiny/config.json")).unwrap(),
        targets::TINY_CONFIG.to_owned(),
        "{}".to_owned(),
        r#"{"model_type": "opt", "vocab_size": 50272, "hidden_size": 1024, "ffn_dim": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "do_layer_norm_before": false,
            "word_embed_proj_dim": 512, "max_position_embeddings": 2048, "torch_dtype": "float16"}"#
            .to_owned(),
        r#"{"d_model": 8, "vocab_size": 16, "ffn_dim": 12, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 6, "enable_bias": false,
            "layer_norm_elementwise_affine": false, "activation_function": "gelu_new",
            "tie_word_embeddings": false, "dropout": 0.5, "pad_token_id": null,
            "_remove_final_layer_norm": true, "dtype": "float32"}"#
            .to_owned(),
    ]
    .into_iter()
    .map(|s| vec![s.into_bytes()])
    .collect()
}

/// JSONL files of every shape under several option sets: the bundled E2E lines, Alpaca and
/// plain text, pre-tokenized ids without a tokenizer, truncation, special-token texts.
pub fn jsonl_corpus() -> Vec<Vec<Vec<u8>>> {
    let lines = |rel: &str, n: usize| -> Vec<u8> {
        let text = String::from_utf8(read(rel)).unwrap();
        let mut out: String = text.lines().take(n).collect::<Vec<_>>().join("\n");
        out.push('\n');
        out.into_bytes()
    };
    let entries: Vec<(u8, Vec<u8>)> = vec![
        (0, lines("e2e/train.jsonl", 30)),
        (0x20, lines("e2e/eval.jsonl", 10)),
        (
            0x80,
            concat!(
                "{\"context\": [5, 6, 2], \"completion\": [7, 8, 2]}\n\n  \n",
                "{\"context\": [9], \"completion\": [2], \"extra\": 1}\n",
                "{\"context\": [], \"completion\": [4]}"
            )
            .into(),
        ),
        (
            0,
            concat!(
                "\u{feff}{\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n",
                "{\"instruction\": \"Hi\", \"input\": null, \"output\": \"Hello\"}\n\n",
                "{\"text\": \"plain text line é\"}\r\n",
                "{\"context\": \"old style\", \"completion\": \" answer\"}\n"
            )
            .into(),
        ),
        (1, lines("e2e/train.jsonl", 5)),
        (
            0x08,
            b"{\"prompt\": \"a </s> b\", \"completion\": \" c <pad>\"}\n".to_vec(),
        ),
        (
            0x10 | 0x20,
            b"{\"prompt\": \"a </s> b\", \"completion\": \" c\"}\n{\"text\": \"</s></s>\"}\n"
                .to_vec(),
        ),
        (
            0x04,
            b"{\"prompt\": \"short\", \"completion\": \" one\"}\n".to_vec(),
        ),
    ];
    entries
        .into_iter()
        .map(|(flags, file)| vec![vec![flags], file])
        .collect()
}

/// opt-tiny's `tokenizer.json` cut down to its first 400 tokens (and the merges among them),
/// plus the same without a post-processor and with a Roberta-style one.
pub fn tokenizer_corpus() -> Vec<Vec<Vec<u8>>> {
    let mut t: Value = serde_json::from_slice(&read("opt-tiny/tokenizer.json")).unwrap();
    let model = &mut t["model"];
    let vocab = model["vocab"].as_object().unwrap().clone();
    let kept: serde_json::Map<String, Value> = vocab
        .into_iter()
        .filter(|(_, id)| id.as_u64().unwrap() < 400)
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let a = m[0].as_str().unwrap();
            let b = m[1].as_str().unwrap();
            kept.contains_key(a) && kept.contains_key(b) && kept.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    assert!(merges.len() > 100, "{} merges kept", merges.len());
    model["vocab"] = Value::Object(kept);
    model["merges"] = Value::Array(merges);
    let small = serde_json::to_vec_pretty(&t).unwrap();
    t["post_processor"] = Value::Null;
    let no_post = serde_json::to_vec(&t).unwrap();
    t["post_processor"] = serde_json::json!({"type": "RobertaProcessing", "sep": ["</s>", 2],
        "cls": ["<s>", 0], "trim_offsets": true, "add_prefix_space": false});
    let roberta = serde_json::to_vec(&t).unwrap();
    vec![vec![small], vec![no_post], vec![roberta]]
}

/// Adapters saved by `save_adapter` for the tiny model (q/v at rank 2, all targets at rank 1
/// with rsLoRA), and a PEFT-style one (nulls, explicit layers, BF16 weights).
pub fn adapter_corpus() -> Vec<Vec<Vec<u8>>> {
    let fx = fixtures();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fuzz-adapters-{}", std::process::id()));
    let mut out = Vec::new();
    for (i, (targets, r, rs)) in [
        (vec![LoraTarget::Q, LoraTarget::V], 2, false),
        (LoraTarget::ALL.to_vec(), 1, true),
    ]
    .into_iter()
    .enumerate()
    {
        let config = LoraConfig {
            r,
            alpha: 4.0,
            dropout: 0.1,
            targets,
            use_rslora: rs,
        };
        let params = LoraParams::init(&config, &fx.tiny, i as u64);
        let d = dir.join(i.to_string());
        save_adapter(&d, &params, "fuzz/tiny").unwrap();
        out.push(vec![
            std::fs::read(d.join("adapter_config.json")).unwrap(),
            std::fs::read(d.join("adapter_model.safetensors")).unwrap(),
        ]);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let peft_config = br#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "lora_dropout": 0.0,
        "target_modules": ["fc1"], "bias": "none", "use_dora": false, "modules_to_save": null,
        "layers_to_transform": [0, 1], "rank_pattern": {}, "alpha_pattern": {}, "revision": null,
        "task_type": "CAUSAL_LM", "fan_in_fan_out": false, "use_rslora": null}"#
        .to_vec();
    let (h, f) = (fx.tiny.hidden_size, fx.tiny.ffn_dim);
    let weights: Vec<WriteTensor<'static>> = (0..2)
        .flat_map(|l| {
            let key = |m: &str| format!("base_model.model.model.decoder.layers.{l}.fc1.{m}.weight");
            [
                WriteTensor::from_f32(key("lora_A"), vec![1, h], &vec![0.5; h], Dtype::BF16),
                WriteTensor::from_f32(key("lora_B"), vec![f, 1], &vec![-0.25; f], Dtype::BF16),
            ]
        })
        .map(Option::unwrap)
        .collect();
    out.push(vec![peft_config, file(&weights, &[])]);
    out
}
