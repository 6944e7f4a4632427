//! Checkpoint loading against the fixture models in `../shared/fixtures` (no GPU): both
//! fixtures load fully; the writer reproduces a fixture file byte for byte; corrupted copies
//! (written to a scratch directory) are rejected with errors naming the file and the tensor.
//!
//! Files are found under `$LEXP_SHARED_DIR`, else `<repo>/../shared`; without them the tests
//! are skipped with a message (`LEXP_REQUIRE_SHARED=1` makes that a failure).

use lexp_runtime::checkpoint::opt::{OptConfig, OptModel, OptWeights};
use lexp_runtime::checkpoint::{
    writer, Checkpoint, CheckpointError, HostMatrix, SafeTensors, WriteTensor,
};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

mod common;

fn fixtures() -> PathBuf {
    let dir = common::shared_dir().join("fixtures");
    assert!(
        dir.join("opt-tiny/config.json").is_file(),
        "fixtures not found at {} (set LEXP_SHARED_DIR)",
        dir.display()
    );
    dir
}

/// A scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lexp-checkpoint-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A writable copy of fixture `model` (the fixtures are read-only).
    fn copy_of(model: &str) -> Scratch {
        let s = Scratch::new(model);
        for entry in fs::read_dir(fixtures().join(model)).unwrap() {
            let entry = entry.unwrap();
            fs::write(s.0.join(entry.file_name()), fs::read(entry.path()).unwrap()).unwrap();
        }
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Rewrites the JSON header of a safetensors file, keeping its data section as it is.
fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    fs::write(path, out).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Loading `dir` fails; returns the message after checking it names `file` and `tensor`.
fn load_err(dir: &Path, file: &str, tensor: Option<&str>) -> String {
    let err = match OptModel::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    };
    let msg = err.to_string();
    let file = dir.join(file);
    assert!(msg.starts_with(&format!("{}: ", file.display())), "{msg}");
    if let Some(t) = tensor {
        assert!(msg.contains(&format!("`{t}`")), "{msg}");
    }
    msg
}

/// f16 values widened to f32 and then f64, to compare with exact f64 literals.
fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn all_finite(w: &OptWeights) -> bool {
    let m = |m: &HostMatrix| m.data.iter().all(|v| v.is_finite());
    m(&w.embed_tokens)
        && m(&w.embed_positions)
        && w.layers.iter().all(|l| {
            [&l.q_proj, &l.k_proj, &l.v_proj, &l.out_proj, &l.fc1, &l.fc2]
                .iter()
                .all(|p| m(&p.weight) && p.bias.iter().flatten().all(|v| v.is_finite()))
        })
}

#[test]
fn opt_tiny_loads_fully() {
    skip_without_shared!();
    let model = OptModel::load(fixtures().join("opt-tiny")).unwrap();
    let (c, w) = (&model.config, &model.weights);
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.ffn_dim
        ),
        (8192, 192, 4, 3, 768)
    );
    assert_eq!(
        (c.head_dim(), c.position_rows(), c.max_position_embeddings),
        (64, 1026, 1024)
    );
    assert!(c.tie_word_embeddings && c.do_layer_norm_before && !c.has_projections());
    assert_eq!(
        (c.dropout, c.pad_token_id, c.eos_token_id),
        (0.0, Some(1), Some(2))
    );
    assert_eq!(c.dtype.as_deref(), Some("float16"));
    assert_eq!(c.num_parameters(), 3_549_696);
    assert_eq!(w.num_parameters(), 3_549_696);

    assert_eq!(w.embed_tokens.shape(), [8192, 192]);
    assert_eq!(w.embed_positions.shape(), [1026, 192]);
    assert!(w.project_in.is_none() && w.project_out.is_none() && w.lm_head.is_none());
    assert!(std::ptr::eq(w.lm_head(), &w.embed_tokens));
    assert_eq!(w.layers.len(), 4);
    assert_eq!(w.layers[0].fc1.weight.shape(), [768, 192]);
    assert_eq!(w.layers[3].fc2.weight.shape(), [192, 768]);
    assert_eq!(w.layers[2].q_proj.bias.as_ref().map(Vec::len), Some(192));
    assert!(w.final_layer_norm.is_some() && w.layers[1].self_attn_layer_norm.is_some());
    assert!(all_finite(w));

    // Values checked independently (Python struct's f16 decoding of the same file).
    assert_eq!(
        f64s(&w.embed_tokens.data[..3]),
        [0.1982421875, 0.12127685546875, 0.1798095703125]
    );
    let pad_norm = w
        .embed_tokens
        .row(1)
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt();
    assert!((pad_norm - 1.66558).abs() < 1e-4, "{pad_norm}");
    let abs_sum: f64 = w.embed_tokens.data.iter().map(|v| v.abs() as f64).sum();
    assert!((abs_sum - 74296.73116469383).abs() < 1e-6, "{abs_sum}");
    let fc2_b = w.layers[3].fc2.bias.as_ref().unwrap();
    assert_eq!(f64s(&fc2_b[..2]), [0.0079345703125, -0.0007472038269042969]);
    let gamma = &w.final_layer_norm.as_ref().unwrap().weight;
    let mean = gamma.iter().sum::<f32>() / gamma.len() as f32;
    assert!((mean - 1.4319).abs() < 1e-4, "{mean}");
}

#[test]
fn opt_mini_loads_sharded() {
    skip_without_shared!();
    let dir = fixtures().join("opt-mini");
    let ckpt = Checkpoint::open(&dir).unwrap();
    assert!(ckpt.is_sharded());
    assert_eq!(ckpt.source(), dir.join("model.safetensors.index.json"));
    assert_eq!((ckpt.shards().len(), ckpt.len()), (2, 100));
    assert_eq!((ckpt.shards()[0].len(), ckpt.shards()[1].len()), (40, 60));
    let t = ckpt.tensor("model.decoder.layers.5.fc1.weight").unwrap();
    assert!(t.file().ends_with("model-00002-of-00002.safetensors"));

    let config = OptConfig::from_file(&dir).unwrap();
    assert_eq!(
        (config.hidden_size, config.num_hidden_layers, config.ffn_dim),
        (384, 6, 1536)
    );
    assert_eq!(config.num_parameters(), 14_187_264);
    let w = OptWeights::load(&ckpt, &config).unwrap();
    assert_eq!(w.num_parameters(), 14_187_264);
    assert_eq!(w.embed_tokens.shape(), [8192, 384]);
    assert_eq!(w.embed_positions.shape(), [1026, 384]);
    assert_eq!(w.layers.len(), 6);
    assert_eq!(w.layers[5].fc1.weight.shape(), [1536, 384]);
    assert!(all_finite(&w));
    let fc1 = &w.layers[5].fc1.weight.data;
    assert_eq!(f64s(&fc1[..2]), [0.00140380859375, -0.0288238525390625]);
    let sum: f64 = fc1.iter().map(|&v| v as f64).sum();
    assert!((sum - -4.066040337085724).abs() < 1e-6, "{sum}");
}

#[test]
fn memory_map_and_read_agree() {
    skip_without_shared!();
    let path = fixtures().join("opt-mini/model-00001-of-00002.safetensors");
    let (a, b) = (
        SafeTensors::open(&path).unwrap(),
        SafeTensors::read(&path).unwrap(),
    );
    assert_eq!(a.metadata().get("format").map(String::as_str), Some("pt"));
    assert!(a.names().eq(b.names()));
    assert!(a
        .tensors()
        .zip(b.tensors())
        .all(|(x, y)| x.bytes() == y.bytes()));
}

#[test]
fn writer_reproduces_the_fixture_byte_for_byte() {
    skip_without_shared!();
    let src = fixtures().join("opt-tiny/model.safetensors");
    let st = SafeTensors::open(&src).unwrap();
    let tensors: Vec<WriteTensor> = st.tensors().map(WriteTensor::from).collect();
    let s = Scratch::new("writer");
    let out = s.path("model.safetensors");
    writer::write(&out, &tensors, &BTreeMap::new()).unwrap();
    assert!(fs::read(&out).unwrap() == fs::read(&src).unwrap());
    // Nothing but the file is left behind.
    assert_eq!(fs::read_dir(&s.0).unwrap().count(), 1);

    // Overwrite it with f32 values; the reader gives them back.
    let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 3.0).collect();
    let t = WriteTensor::from_f32(
        "lora_A",
        vec![3, 4],
        &values,
        lexp_runtime::checkpoint::Dtype::F32,
    )
    .unwrap();
    writer::write(&out, &[t], &BTreeMap::new()).unwrap();
    let back = SafeTensors::open(&out).unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back.get("lora_A").unwrap().to_f32().unwrap(), values);
    assert_eq!(fs::read_dir(&s.0).unwrap().count(), 1);
}

#[test]
fn writer_failure_names_the_file_and_keeps_the_old_one() {
    skip_without_shared!();
    let s = Scratch::new("writer-fail");
    let missing = s.path("no/such/dir/adapter_model.safetensors");
    let msg = writer::write(&missing, &[], &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!("{}: cannot", missing.display())),
        "{msg}"
    );

    let out = s.path("adapter_model.safetensors");
    fs::write(&out, b"old").unwrap();
    let msg = writer::write_atomic(&out, |w| {
        std::io::Write::write_all(w, b"partial")?;
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains("disk full"), "{msg}");
    assert_eq!(fs::read(&out).unwrap(), b"old");
    assert_eq!(
        fs::read_dir(&s.0).unwrap().count(),
        1,
        "temporary file left behind"
    );
}

#[test]
fn truncated_file() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-tiny");
    let path = s.path("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let msg = load_err(
        &s.0,
        "model.safetensors",
        Some("model.decoder.layers.3.self_attn_layer_norm.weight"),
    );
    assert!(
        msg.contains(
            "data_offsets [7099008, 7099392] exceed the file's data section (7099292 bytes)"
        ),
        "{msg}"
    );
}

#[test]
fn header_length_past_the_end() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-tiny");
    let path = s.path("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    let msg = load_err(&s.0, "model.safetensors", None);
    assert!(
        msg.contains(&format!(
            "header length {len} runs past the end of the file"
        )),
        "{msg}"
    );
}

#[test]
fn overlapping_offsets() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-mini");
    let shard = "model-00002-of-00002.safetensors";
    let name = "model.decoder.layers.3.fc1.weight";
    edit_header(&s.path(shard), |h| {
        let offsets = &mut h[name]["data_offsets"];
        let (b, e) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        *offsets = json!([b - 2, e - 2]);
    });
    let msg = load_err(&s.0, shard, Some(name));
    assert!(
        msg.contains("overlap tensor `model.decoder.layers.3.fc1.bias`"),
        "{msg}"
    );
}

#[test]
fn unknown_dtype() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-mini");
    let shard = "model-00001-of-00002.safetensors";
    let name = "model.decoder.layers.0.fc2.bias";
    edit_header(&s.path(shard), |h| h[name]["dtype"] = json!("F17"));
    let msg = load_err(&s.0, shard, Some(name));
    assert!(msg.contains("unknown dtype `F17`"), "{msg}");
}

#[test]
fn dtype_that_cannot_be_loaded() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-tiny");
    let name = "model.decoder.layers.1.fc1.bias";
    edit_header(&s.path("model.safetensors"), |h| {
        h[name]["dtype"] = json!("I16")
    });
    let msg = load_err(&s.0, "model.safetensors", Some(name));
    assert!(msg.contains("dtype I16 cannot be loaded as f32"), "{msg}");
}

#[test]
fn shape_disagrees_with_bytes() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-tiny");
    let name = "model.decoder.layers.2.fc1.weight";
    edit_header(&s.path("model.safetensors"), |h| {
        h[name]["shape"] = json!([768, 191])
    });
    let msg = load_err(&s.0, "model.safetensors", Some(name));
    assert!(
        msg.contains("dtype F16 and shape [768, 191] need 293376 bytes"),
        "{msg}"
    );
    assert!(msg.contains("hold 294912"), "{msg}");
}

#[test]
fn missing_shard() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-mini");
    fs::remove_file(s.path("model-00002-of-00002.safetensors")).unwrap();
    let msg = load_err(
        &s.0,
        "model.safetensors.index.json",
        Some("model.decoder.layers.2.fc1.bias"),
    );
    assert!(
        msg.contains("shard `model-00002-of-00002.safetensors`, which does not exist"),
        "{msg}"
    );
}

#[test]
fn index_and_shards_disagree() {
    skip_without_shared!();
    let index = "model.safetensors.index.json";
    let name = "model.decoder.layers.0.fc1.weight";
    // Mapped to the wrong shard: the shard it names lacks it.
    let s = Scratch::copy_of("opt-mini");
    edit_json(&s.path(index), |v| {
        v["weight_map"][name] = json!("model-00002-of-00002.safetensors")
    });
    let msg = load_err(&s.0, "model-00001-of-00002.safetensors", Some(name));
    assert!(
        msg.contains("maps it to `model-00002-of-00002.safetensors`"),
        "{msg}"
    );
    // Not listed at all.
    let s = Scratch::copy_of("opt-mini");
    edit_json(&s.path(index), |v| {
        v["weight_map"].as_object_mut().unwrap().remove(name);
    });
    let msg = load_err(&s.0, "model-00001-of-00002.safetensors", Some(name));
    assert!(msg.contains("does not list it"), "{msg}");
    // Listed but in no shard.
    let s = Scratch::copy_of("opt-mini");
    let ghost = "model.decoder.layers.9.fc1.weight";
    edit_json(&s.path(index), |v| {
        v["weight_map"][ghost] = json!("model-00001-of-00002.safetensors")
    });
    let msg = load_err(&s.0, "model-00001-of-00002.safetensors", Some(ghost));
    assert!(msg.contains("is not in the file"), "{msg}");
    // A shard path that leaves the directory.
    let s = Scratch::copy_of("opt-mini");
    edit_json(&s.path(index), |v| {
        v["weight_map"][name] = json!("../model-00001-of-00002.safetensors")
    });
    let msg = load_err(&s.0, index, Some(name));
    assert!(
        msg.contains("is not a file name in the checkpoint's directory"),
        "{msg}"
    );
}

#[test]
fn config_mismatching_the_weights() {
    skip_without_shared!();
    let edit = |f: &dyn Fn(&mut Value)| {
        let s = Scratch::copy_of("opt-tiny");
        edit_json(&s.path("config.json"), |v| f(v));
        s
    };
    let s = edit(&|v| v["ffn_dim"] = json!(512));
    let msg = load_err(
        &s.0,
        "model.safetensors",
        Some("model.decoder.layers.0.fc1.weight"),
    );
    assert!(
        msg.contains("shape [768, 192] does not match the config (expected [512, 192])"),
        "{msg}"
    );

    let s = edit(&|v| v["num_hidden_layers"] = json!(3));
    let msg = load_err(
        &s.0,
        "model.safetensors",
        Some("model.decoder.layers.3.fc1.bias"),
    );
    assert!(msg.contains("is not a weight of this model"), "{msg}");

    let s = edit(&|v| v["num_hidden_layers"] = json!(5));
    let msg = load_err(
        &s.0,
        "model.safetensors",
        Some("model.decoder.layers.4.self_attn.q_proj.weight"),
    );
    assert!(msg.contains("missing tensor"), "{msg}");

    let s = edit(&|v| v["tie_word_embeddings"] = json!(false));
    load_err(&s.0, "model.safetensors", Some("lm_head.weight"));

    let s = edit(&|v| v["word_embed_proj_dim"] = json!(128));
    load_err(
        &s.0,
        "model.safetensors",
        Some("model.decoder.embed_tokens.weight"),
    );

    let s = edit(&|v| v["hidden_size"] = json!(190));
    let msg = load_err(&s.0, "config.json", None);
    assert!(
        msg.contains("hidden_size 190 is not divisible by num_attention_heads 3"),
        "{msg}"
    );
}

#[test]
fn config_defaults_and_validation() {
    skip_without_shared!();
    let file = Path::new("config.json");
    let c = OptConfig::from_json("{}", file).unwrap();
    // transformers' defaults (opt-125m).
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            c.ffn_dim,
            c.max_position_embeddings
        ),
        (50272, 768, 12, 3072, 2048)
    );
    assert_eq!(
        (c.word_embed_proj_dim, c.dropout, c.tie_word_embeddings),
        (768, 0.1, true)
    );
    assert_eq!(c.num_parameters(), 125_239_296);
    let c = OptConfig::from_json(
        r#"{"d_model": 1024, "num_attention_heads": 16, "word_embed_proj_dim": 512,
        "do_layer_norm_before": false, "torch_dtype": "float16", "future_field": [1]}"#,
        file,
    )
    .unwrap();
    assert_eq!(
        (c.hidden_size, c.head_dim(), c.dtype.as_deref()),
        (1024, 64, Some("float16"))
    );
    assert!(c.has_projections() && !c.has_final_layer_norm());
    let names: Vec<String> = c.decoder_tensors().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"project_in.weight".to_owned()));
    assert!(!names.contains(&"final_layer_norm.weight".to_owned()));

    for (text, want) in [
        (r#"{"model_type": "gpt2"}"#, "model_type is `gpt2`"),
        (
            r#"{"activation_function": "tanh"}"#,
            "activation_function `tanh` is not supported",
        ),
        (r#"{"dropout": 1.0}"#, "dropout 1 is not a probability"),
        (r#"{"ffn_dim": 0}"#, "ffn_dim must be positive"),
        (
            r#"{"pad_token_id": 60000}"#,
            "pad_token_id 60000 is outside the vocabulary",
        ),
        (r#"{"hidden_size": "big"}"#, "invalid config"),
        ("[1]", "invalid config"),
    ] {
        let msg = OptConfig::from_json(text, file).unwrap_err().to_string();
        assert!(
            msg.starts_with("config.json: ") && msg.contains(want),
            "{text}: {msg}"
        );
    }
}

#[test]
fn bare_decoder_prefix_and_untied_head() {
    skip_without_shared!();
    let s = Scratch::copy_of("opt-tiny");
    let path = s.path("model.safetensors");
    let st = SafeTensors::open(fixtures().join("opt-tiny/model.safetensors")).unwrap();
    let mut tensors: Vec<WriteTensor> = st
        .tensors()
        .map(|t| WriteTensor {
            name: t.name().replace("model.decoder.", "decoder."),
            ..t.into()
        })
        .collect();
    let head = WriteTensor {
        name: "lm_head.weight".into(),
        ..st.get("model.decoder.embed_tokens.weight").unwrap().into()
    };
    tensors.push(head);
    writer::write(&path, &tensors, &BTreeMap::new()).unwrap();

    // Tied: lm_head.weight is ignored, the rest loads under `decoder.`.
    let tied = OptModel::load(&s.0).unwrap().weights;
    let reference = OptModel::load(fixtures().join("opt-tiny")).unwrap().weights;
    assert_eq!(tied, reference);
    // Untied: lm_head.weight is the head.
    edit_json(&s.path("config.json"), |v| {
        v["tie_word_embeddings"] = json!(false)
    });
    let untied = OptModel::load(&s.0).unwrap().weights;
    assert_eq!(untied.lm_head.as_ref(), Some(&reference.embed_tokens));
    assert_eq!(untied.num_parameters(), 3_549_696 + 8192 * 192);

    // An extra tensor is rejected, named with its file.
    tensors.push(WriteTensor {
        name: "decoder.layers.0.fc3.weight".into(),
        ..st.get("model.decoder.layers.0.fc1.weight").unwrap().into()
    });
    writer::write(&path, &tensors, &BTreeMap::new()).unwrap();
    let msg = load_err(
        &s.0,
        "model.safetensors",
        Some("decoder.layers.0.fc3.weight"),
    );
    assert!(msg.contains("is not a weight of this model"), "{msg}");
}

#[test]
fn no_weights_in_directory() {
    skip_without_shared!();
    let s = Scratch::new("empty");
    let err = Checkpoint::open(&s.0).unwrap_err();
    assert!(matches!(err, CheckpointError::NoWeights { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("no model.safetensors.index.json or model.safetensors"));
}
