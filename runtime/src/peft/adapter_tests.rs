//! Tests of the PEFT adapter directory: round trips, the exact keys and config fields of
//! RUNTIME.md §3.2–3.3, and every rejection of `load_adapter`.

use super::*;
use crate::checkpoint::writer::{self, WriteTensor};
use crate::checkpoint::{Dtype, OptConfig, SafeTensors};
use crate::data::SplitMix64;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// opt-tiny's shape: H 192, F 768, 4 layers.
fn tiny() -> OptConfig {
    OptConfig::from_json(
        r#"{"model_type":"opt","vocab_size":8192,"hidden_size":192,"ffn_dim":768,
            "num_hidden_layers":4,"num_attention_heads":3,"max_position_embeddings":256}"#,
        Path::new("tiny/config.json"),
    )
    .unwrap()
}

/// A fresh, empty directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lexp-peft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Initialised parameters with random, non-zero B (so a dropped B would be noticed).
fn params(targets: &[LoraTarget], r: usize, seed: u64) -> LoraParams {
    let config = LoraConfig {
        r,
        alpha: 12.0,
        dropout: 0.05,
        targets: targets.to_vec(),
        use_rslora: false,
    };
    let mut p = LoraParams::init(&config, &tiny(), seed);
    let mut rng = SplitMix64::new(seed ^ 0xB);
    for (_, m) in p.tensors_mut() {
        for x in &mut m.data {
            *x = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
    }
    p
}

fn read_config(dir: &Path) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    match serde_json::from_str(&text).unwrap() {
        Value::Object(m) => m,
        v => panic!("not an object: {v}"),
    }
}

fn write_config(dir: &Path, config: &serde_json::Map<String, Value>) {
    std::fs::write(
        dir.join(CONFIG_FILE),
        serde_json::to_string(config).unwrap(),
    )
    .unwrap();
}

/// Rewrites the adapter's weights through `edit` (on name → (shape, f32 values)).
fn edit_weights(
    dir: &Path,
    dtype: Dtype,
    edit: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>),
) {
    let path = dir.join(WEIGHTS_FILE);
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)> = {
        let st = SafeTensors::read(&path).unwrap();
        st.tensors()
            .map(|v| {
                (
                    v.name().to_owned(),
                    (v.shape().to_vec(), v.to_f32().unwrap()),
                )
            })
            .collect()
    };
    edit(&mut tensors);
    let out: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|(n, (s, d))| WriteTensor::from_f32(n.clone(), s.clone(), d, dtype).unwrap())
        .collect();
    writer::write(&path, &out, &BTreeMap::new()).unwrap();
}

fn load_err(dir: &Path) -> (PeftError, String) {
    let e = load_adapter(dir, &tiny()).unwrap_err();
    let msg = e.to_string();
    (e, msg)
}

/// The §3.3 key list, built independently of `tensor_key`.
fn expected_keys(targets: &[&str], r: usize) -> BTreeMap<String, Vec<usize>> {
    let (h, f) = (192, 768);
    let mut out = BTreeMap::new();
    for i in 0..4 {
        for &t in targets {
            let (path, a, b) = match t {
                "fc1" => (format!("model.decoder.layers.{i}.fc1"), [r, h], [f, r]),
                "fc2" => (format!("model.decoder.layers.{i}.fc2"), [r, f], [h, r]),
                _ => (
                    format!("model.decoder.layers.{i}.self_attn.{t}"),
                    [r, h],
                    [h, r],
                ),
            };
            out.insert(format!("base_model.model.{path}.lora_A.weight"), a.to_vec());
            out.insert(format!("base_model.model.{path}.lora_B.weight"), b.to_vec());
        }
    }
    out
}

#[test]
fn saves_the_exact_keys_shapes_and_metadata() {
    for (targets, names, count) in [
        (
            vec![LoraTarget::Q, LoraTarget::V],
            vec!["q_proj", "v_proj"],
            16,
        ),
        (
            LoraTarget::ALL.to_vec(),
            vec!["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            48,
        ),
    ] {
        let dir = scratch(&format!("keys-{count}"));
        let p = params(&targets, 4, 1);
        save_adapter(&dir, &p, "fixtures/opt-tiny").unwrap();
        let st = SafeTensors::open(dir.join(WEIGHTS_FILE)).unwrap();
        assert_eq!(st.len(), count);
        assert_eq!(st.metadata().get("format").map(String::as_str), Some("pt"));
        let found: BTreeMap<String, Vec<usize>> = st
            .tensors()
            .map(|v| {
                assert_eq!(v.dtype(), Dtype::F32, "{}", v.name());
                (v.name().to_owned(), v.shape().to_vec())
            })
            .collect();
        assert_eq!(found, expected_keys(&names, 4));
        // The values are the parameters, bit for bit.
        for (name, m) in p.tensors() {
            assert_eq!(st.get(&name).unwrap().to_f32().unwrap(), m.data, "{name}");
        }
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!((8 + header_len) % 8, 0);
    }
}

#[test]
fn config_json_has_peft_fields_sorted_and_formatted() {
    let dir = scratch("config");
    let p = params(&[LoraTarget::V, LoraTarget::Fc1, LoraTarget::Q], 4, 2);
    save_adapter(&dir, &p, "facebook/opt-125m").unwrap();
    let c = read_config(&dir);
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(c["r"], 4);
    assert!(c["r"].is_u64());
    assert_eq!(c["lora_alpha"], 12);
    assert!(
        c["lora_alpha"].is_u64(),
        "integral alpha is written as an int"
    );
    assert_eq!(c["lora_dropout"].as_f64(), Some(0.05));
    assert_eq!(
        c["target_modules"],
        serde_json::json!(["fc1", "q_proj", "v_proj"])
    );
    assert_eq!(c["base_model_name_or_path"], "facebook/opt-125m");
    assert_eq!(c["bias"], "none");
    assert_eq!(c["inference_mode"], true);
    assert_eq!(c["init_lora_weights"], true);
    assert_eq!(c["fan_in_fan_out"], false);
    assert_eq!(c["use_rslora"], false);
    assert_eq!(c["use_dora"], false);
    assert_eq!(c["lora_bias"], false);
    for k in [
        "layers_to_transform",
        "layers_pattern",
        "modules_to_save",
        "revision",
    ] {
        assert!(c[k].is_null(), "{k}");
    }
    assert_eq!(c["rank_pattern"], serde_json::json!({}));
    assert_eq!(c["alpha_pattern"], serde_json::json!({}));
    // Every field RUNTIME.md §3.2 lists for peft 0.21 except the optional peft_version.
    let listed = "alora_invocation_tokens, alpha_pattern, arrow_config, auto_mapping,
        base_model_name_or_path, bias, corda_config, ensure_weight_tying, eva_config,
        exclude_modules, fan_in_fan_out, inference_mode, init_lora_weights, kasa_config,
        layer_replication, layers_pattern, layers_to_transform, loftq_config, lora_alpha,
        lora_bias, lora_dropout, lora_ga_config, megatron_config, megatron_core,
        modules_to_save, monteclora_config, peft_type, qalora_group_size, r, rank_pattern,
        revision, target_modules, target_parameters, task_type, trainable_token_indices,
        use_bdlora, use_dora, use_qalora, use_rslora, velora_config";
    let listed: Vec<&str> = listed.split(',').map(str::trim).collect();
    assert_eq!(c.keys().map(String::as_str).collect::<Vec<_>>(), listed);

    // Python's json.dumps(indent=2, sort_keys=True) layout: keys in file order sorted.
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    assert!(text.starts_with("{\n  \"alora_invocation_tokens\": null,\n  \"alpha_pattern\": {},\n"));
    assert!(text.contains(
        "  \"target_modules\": [\n    \"fc1\",\n    \"q_proj\",\n    \"v_proj\"\n  ],\n"
    ));
    assert!(text.contains("\n  \"lora_dropout\": 0.05,\n"), "{text}");
    let positions: Vec<usize> = listed
        .iter()
        .map(|k| text.find(&format!("\n  \"{k}\": ")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn non_ascii_and_fractional_values_are_written_as_python_does() {
    let dir = scratch("ascii");
    let mut p = params(&[LoraTarget::Q], 2, 3);
    p.config.alpha = 2.5;
    p.config.use_rslora = true;
    save_adapter(&dir, &p, "models/modèle-😀").unwrap();
    let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    assert!(text.is_ascii());
    assert!(
        text.contains(r#""models/mod\u00e8le-\ud83d\ude00""#),
        "{text}"
    );
    assert!(text.contains("\"lora_alpha\": 2.5,"));
    let c = read_config(&dir);
    assert_eq!(c["base_model_name_or_path"], "models/modèle-😀");
    let back = load_adapter(&dir, &tiny()).unwrap();
    assert_eq!(back, p);
    assert_eq!(back.config.scaling(), 2.5 / 2f32.sqrt());
}

#[test]
fn round_trips_every_target_set() {
    for (i, targets) in [
        vec![LoraTarget::Q, LoraTarget::V],
        LoraTarget::ALL.to_vec(),
        vec![LoraTarget::Fc2],
    ]
    .into_iter()
    .enumerate()
    {
        let dir = scratch(&format!("roundtrip-{i}"));
        let p = params(&targets, 3, 10 + i as u64);
        save_adapter(&dir, &p, "base").unwrap();
        let back = load_adapter(&dir, &tiny()).unwrap();
        assert_eq!(back, p);
        // Saving again over the old files works (atomic replace) and leaves no temp files.
        save_adapter(&dir, &back, "base").unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&*dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
    }
}

#[test]
fn loads_f16_bf16_and_peft_style_configs() {
    let p = params(&[LoraTarget::Q, LoraTarget::V], 4, 4);
    for dtype in [Dtype::F16, Dtype::BF16] {
        let dir = scratch(&format!("dtype-{dtype}"));
        save_adapter(&dir, &p, "base").unwrap();
        edit_weights(&dir, dtype, |_| {});
        let back = load_adapter(&dir, &tiny()).unwrap();
        for ((n, a), (_, b)) in p.tensors().into_iter().zip(back.tensors()) {
            for (x, y) in a.data.iter().zip(&b.data) {
                let want = match dtype {
                    Dtype::F16 => half::f16::from_f32(*x).to_f32(),
                    _ => half::bf16::from_f32(*x).to_f32(),
                };
                assert_eq!(*y, want, "{n}");
            }
        }
    }

    // A minimal config as a person might write it; full module paths and suffixes match.
    let dir = scratch("minimal");
    save_adapter(&dir, &p, "base").unwrap();
    let mut c = serde_json::Map::new();
    c.insert("peft_type".into(), "LORA".into());
    c.insert("r".into(), 4.into());
    c.insert("lora_alpha".into(), 12.0.into());
    c.insert(
        "target_modules".into(),
        serde_json::json!(["self_attn.q_proj", "v_proj"]),
    );
    c.insert(
        "layers_to_transform".into(),
        serde_json::json!([3, 2, 1, 0]),
    );
    write_config(&dir, &c);
    let back = load_adapter(&dir, &tiny()).unwrap();
    assert_eq!(back.config.targets, [LoraTarget::Q, LoraTarget::V]);
    assert_eq!((back.config.alpha, back.config.dropout), (12.0, 0.0));
    assert_eq!(back.layers, p.layers);
    // No target_modules: PEFT's OPT default, q_proj and v_proj.
    c.remove("target_modules");
    write_config(&dir, &c);
    assert_eq!(load_adapter(&dir, &tiny()).unwrap().layers, p.layers);

    // "all-linear" targets all six projections.
    let all = params(&LoraTarget::ALL, 2, 5);
    save_adapter(&dir, &all, "base").unwrap();
    let mut c = read_config(&dir);
    c.insert("target_modules".into(), "all-linear".into());
    write_config(&dir, &c);
    assert_eq!(load_adapter(&dir, &tiny()).unwrap(), all);
}

#[test]
fn missing_files_are_named() {
    let dir = scratch("missing");
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, PeftError::MissingFile { ref file, .. } if file.ends_with(CONFIG_FILE)),
        "{msg}"
    );
    save_adapter(&dir, &params(&[LoraTarget::Q], 2, 1), "base").unwrap();
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join("adapter_model.bin"), b"pickle").unwrap();
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, PeftError::MissingFile { ref file, .. } if file.ends_with(WEIGHTS_FILE)),
        "{msg}"
    );
    assert!(
        msg.contains("adapter_model.safetensors: no such file") && msg.contains("legacy"),
        "{msg}"
    );
}

#[test]
fn bad_tensors_are_rejected_by_name() {
    let p = params(&[LoraTarget::Q, LoraTarget::V], 4, 6);
    let dir = scratch("tensors");
    let key = |l, t, f| tensor_key(l, t, f);
    let fresh = || save_adapter(&dir, &p, "base").unwrap();

    // A key that maps to nothing in this model: misspelt, adapter name inserted, layer 4.
    for bad in [
        "base_model.model.model.decoder.layers.0.self_attn.q_prj.lora_A.weight",
        "base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.default.weight",
        "base_model.model.model.decoder.layers.4.self_attn.q_proj.lora_A.weight",
    ] {
        fresh();
        edit_weights(&dir, Dtype::F32, |t| {
            t.insert(bad.into(), (vec![4, 192], vec![0.0; 4 * 192]));
        });
        let (e, msg) = load_err(&dir);
        assert!(
            matches!(e, PeftError::UnexpectedTensor { ref tensor, .. } if tensor == bad),
            "{msg}"
        );
        assert!(msg.contains("maps to no LoRA matrix"), "{msg}");
    }
    // A real module that the config does not target.
    fresh();
    edit_weights(&dir, Dtype::F32, |t| {
        t.insert(
            key(1, LoraTarget::K, LoraFactor::B),
            (vec![192, 4], vec![0.0; 768]),
        );
    });
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, PeftError::UnexpectedTensor { .. }), "{msg}");
    assert!(
        msg.contains("`k_proj`, which is not in adapter_config.json's target_modules"),
        "{msg}"
    );

    // Missing A, then missing B.
    for factor in [LoraFactor::A, LoraFactor::B] {
        fresh();
        let gone = key(2, LoraTarget::V, factor);
        edit_weights(&dir, Dtype::F32, |t| {
            t.remove(&gone);
        });
        let (e, msg) = load_err(&dir);
        assert!(
            matches!(e, PeftError::MissingTensor { ref tensor, module: "v_proj", .. } if *tensor == gone),
            "{msg}"
        );
    }

    // Shape mismatch: B transposed; A with the wrong rank.
    for (name, shape) in [
        (key(0, LoraTarget::Q, LoraFactor::B), vec![4, 192]),
        (key(3, LoraTarget::V, LoraFactor::A), vec![8, 192]),
    ] {
        fresh();
        let n = shape.iter().product();
        edit_weights(&dir, Dtype::F32, |t| {
            t.insert(name.clone(), (shape.clone(), vec![0.0; n]));
        });
        let (e, msg) = load_err(&dir);
        match e {
            PeftError::ShapeMismatch {
                tensor,
                expected,
                found,
                ..
            } => {
                assert_eq!(tensor, name);
                assert_eq!(found, shape);
                assert_eq!(
                    expected,
                    if name.contains("lora_B") {
                        [192, 4]
                    } else {
                        [4, 192]
                    }
                );
            }
            e => panic!("{e}"),
        }
        assert!(msg.contains(&name) && msg.contains("expected"), "{msg}");
    }

    // A non-float dtype is named with its tensor.
    fresh();
    let path = dir.join(WEIGHTS_FILE);
    let tensors: Vec<WriteTensor<'static>> = p
        .tensors()
        .into_iter()
        .map(|(n, m)| {
            let dtype = if n == key(0, LoraTarget::Q, LoraFactor::A) {
                Dtype::I32
            } else {
                Dtype::F32
            };
            WriteTensor {
                name: n,
                dtype,
                shape: m.shape().to_vec(),
                bytes: m
                    .data
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
            }
        })
        .collect();
    writer::write(&path, &tensors, &BTreeMap::new()).unwrap();
    let (e, msg) = load_err(&dir);
    assert!(matches!(e, PeftError::Safetensors(_)), "{msg}");
    assert!(msg.contains("dtype I32 cannot be loaded"), "{msg}");
}

#[test]
fn unsupported_configs_are_rejected_by_key() {
    let p = params(&[LoraTarget::Q, LoraTarget::V], 4, 7);
    let dir = scratch("configs");
    save_adapter(&dir, &p, "base").unwrap();
    let base = read_config(&dir);
    let check = |key: &str, value: Value, expect: &dyn Fn(&PeftError) -> bool, text: &str| {
        let mut c = base.clone();
        c.insert(key.into(), value.clone());
        write_config(&dir, &c);
        let (e, msg) = load_err(&dir);
        assert!(expect(&e), "{key} = {value}: {msg}");
        assert!(msg.contains(text), "{key} = {value}: {msg}");
        assert!(msg.contains(CONFIG_FILE), "{msg}");
    };
    let unsupported = |key: &'static str| move |e: &PeftError| matches!(e, PeftError::Unsupported { key: k, .. } if k == key);
    check(
        "peft_type",
        "IA3".into(),
        &|e| matches!(e, PeftError::NotLora { peft_type, .. } if peft_type == "IA3"),
        "only `LORA`",
    );
    check("use_dora", true.into(), &unsupported("use_dora"), "DoRA");
    check(
        "bias",
        "all".into(),
        &unsupported("bias"),
        "is not supported",
    );
    check(
        "bias",
        "lora_only".into(),
        &unsupported("bias"),
        "only \"none\"",
    );
    check(
        "rank_pattern",
        serde_json::json!({"q_proj": 8}),
        &unsupported("rank_pattern"),
        "not implemented yet",
    );
    check(
        "alpha_pattern",
        serde_json::json!({"v_proj": 32}),
        &unsupported("alpha_pattern"),
        "not supported",
    );
    check(
        "target_modules",
        ".*(q|v)_proj".into(),
        &unsupported("target_modules"),
        "regular expression",
    );
    check(
        "target_modules",
        serde_json::json!(["q_proj", "lm_head"]),
        &unsupported("target_modules"),
        "`lm_head`",
    );
    check(
        "target_modules",
        serde_json::json!(["model.decoder.layers.0.self_attn.q_proj", "v_proj"]),
        &unsupported("target_modules"),
        "`q_proj` in only 1 of the 4 layers",
    );
    check(
        "layers_to_transform",
        serde_json::json!([0, 1]),
        &unsupported("layers_to_transform"),
        "only some layers",
    );
    check(
        "modules_to_save",
        serde_json::json!(["lm_head"]),
        &unsupported("modules_to_save"),
        "not supported",
    );
    check(
        "r",
        0.into(),
        &|e| matches!(e, PeftError::Config { .. }),
        "`r` must be a positive integer",
    );
    check(
        "lora_dropout",
        1.5.into(),
        &|e| matches!(e, PeftError::Config { .. }),
        "lora_dropout",
    );
    check(
        "target_modules",
        serde_json::json!([]),
        &|e| matches!(e, PeftError::Config { .. }),
        "no LoRA target",
    );

    let mut c = base.clone();
    c.remove("peft_type");
    write_config(&dir, &c);
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, PeftError::Config { .. }) && msg.contains("missing `peft_type`"),
        "{msg}"
    );
    std::fs::write(dir.join(CONFIG_FILE), "{not json").unwrap();
    let (e, msg) = load_err(&dir);
    assert!(
        matches!(e, PeftError::Config { .. }) && msg.contains("invalid JSON"),
        "{msg}"
    );

    // The untouched config still loads.
    write_config(&dir, &base);
    assert_eq!(load_adapter(&dir, &tiny()).unwrap(), p);
}
