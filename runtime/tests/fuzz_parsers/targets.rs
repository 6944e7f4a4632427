//! The fuzz targets: one function per parser of outside data, taking the raw input bytes and
//! returning `Ok` or a clean error message. A panic, a hang or a huge allocation is the bug the
//! callers look for. Shared by the time-boxed fuzzer of `runtime/tests/fuzz_parsers.rs` and the
//! cargo-fuzz targets of `fuzz/` (which include this file by path), so that an input found by
//! one reproduces in the other.
//!
//! Targets with several files (an index and its shards, an adapter's config and weights) take
//! them [`join`]ed: each part but the last is prefixed by its length (u32, little-endian).

#![allow(dead_code)]

use lexp_runtime::checkpoint::{Checkpoint, OptConfig, OptWeights, SafeTensors};
use lexp_runtime::data::{parse_jsonl, JsonlOptions, Overflow, SpecialTokenText, Tokenizer};
use lexp_runtime::peft::adapter::load_adapter_from_bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What one input did: `Ok`, or the error's message.
pub type Outcome = Result<(), String>;

/// File names of the two shards the `sharded_index` target's index may list.
pub const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

/// The tiny OPT config the `opt_config` target loads weights for and the `adapter` target
/// loads adapters for (H 8, F 12, 2 layers, 2 heads, vocabulary 16, 6 positions).
pub const TINY_CONFIG: &str = r#"{"model_type": "opt", "vocab_size": 16, "hidden_size": 8,
  "ffn_dim": 12, "num_hidden_layers": 2, "num_attention_heads": 2,
  "max_position_embeddings": 6, "word_embed_proj_dim": 8, "pad_token_id": 1,
  "bos_token_id": 2, "eos_token_id": 2}"#;

/// Inputs that do not change between fuzz inputs: a real tokenizer for JSONL text lines, the
/// tiny model's config and an in-memory checkpoint holding its weights.
pub struct Fixtures {
    /// `assets/default/opt-tiny/tokenizer.json`.
    pub tokenizer: Tokenizer,
    /// [`TINY_CONFIG`], parsed.
    pub tiny: OptConfig,
    /// The tiny model's weights (`model.decoder.` names, F32, one shard).
    pub tiny_checkpoint: Checkpoint,
}

impl Fixtures {
    /// The fixtures of the repository's bundled `assets/default`, loaded once per process.
    /// Both crates that include this file (`runtime`'s tests and `fuzz/`) sit one directory
    /// below the repository root, so the path is the same from either.
    pub fn bundled() -> &'static Fixtures {
        static FX: std::sync::OnceLock<Fixtures> = std::sync::OnceLock::new();
        FX.get_or_init(|| {
            Fixtures::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default"))
        })
    }

    /// Loads the fixtures; `assets` is the repository's `assets/default`.
    pub fn load(assets: &Path) -> Fixtures {
        let tokenizer = Tokenizer::from_file(assets.join("opt-tiny/tokenizer.json"))
            .unwrap_or_else(|e| panic!("fixture tokenizer: {e}"));
        let tiny = OptConfig::from_json(TINY_CONFIG, Path::new("tiny/config.json"))
            .unwrap_or_else(|e| panic!("tiny config: {e}"));
        let shard = tiny_weights(&tiny);
        let index = format!(
            "{{\"weight_map\": {{{}}}}}",
            SafeTensors::from_bytes("tiny", shard.clone())
                .unwrap_or_else(|e| panic!("tiny weights: {e}"))
                .names()
                .map(|n| format!("\"{n}\": \"{}\"", SHARDS[0]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let tiny_checkpoint = Checkpoint::from_index_bytes(
            "tiny/model.safetensors.index.json",
            &index,
            HashMap::from([(SHARDS[0].to_owned(), shard)]),
        )
        .unwrap_or_else(|e| panic!("tiny checkpoint: {e}"));
        Fixtures {
            tokenizer,
            tiny,
            tiny_checkpoint,
        }
    }
}

/// A safetensors file with every weight of `config` (F32, values `i / 64` by position).
pub fn tiny_weights(config: &OptConfig) -> Vec<u8> {
    use lexp_runtime::checkpoint::{writer, Dtype, WriteTensor};
    let tensors: Vec<WriteTensor<'static>> = config
        .decoder_tensors()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 / 64.0).collect();
            WriteTensor::from_f32(format!("model.decoder.{name}"), shape, &values, Dtype::F32)
                .expect("F32 is loadable")
        })
        .collect();
    writer::to_bytes(&tensors, &Default::default()).expect("valid tensors")
}

/// Concatenates `parts`, each but the last prefixed by its length (u32 LE): the encoding of
/// multi-file inputs that [`split`] undoes.
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            let len = u32::try_from(p.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_le_bytes());
        }
        out.extend_from_slice(p);
    }
    out
}

/// Splits `data` into `n` parts as [`join`] wrote them; lengths past the end are clamped, so
/// every byte string splits into something.
pub fn split(mut data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    for _ in 1..n {
        let len = match data.get(..4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
            None => 0,
        };
        data = data.get(4..).unwrap_or(&[]);
        let len = len.min(data.len());
        parts.push(&data[..len]);
        data = &data[len..];
    }
    parts.push(data);
    parts
}

/// Text for the JSON parsers (which take `&str`): invalid UTF-8 becomes U+FFFD, so the
/// mutated bytes still reach the JSON checks.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads every tensor of a validated file the way the loaders do, checking the reader's
/// promises: sizes agree with dtype and shape, lookups by name find the tensor, conversions
/// give one value per element or an error naming the tensor. Tensors over 64 KiB are not
/// converted (the same code as for small ones, and slow in debug builds).
fn read_all(st: &SafeTensors) -> Outcome {
    let _ = st.metadata().len();
    for t in st.tensors() {
        assert!(
            st.contains(t.name()),
            "tensor `{}` not found by name",
            t.name()
        );
        let numel = t.numel();
        let bits = numel as u128 * t.dtype().bits() as u128;
        assert_eq!(t.bytes().len() as u128 * 8, bits, "size of `{}`", t.name());
        if t.bytes().len() > 64 << 10 {
            continue;
        }
        match t.to_f32() {
            Ok(v) => assert_eq!(v.len(), numel, "to_f32 of `{}`", t.name()),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(t.name()),
                    "error does not name the tensor: {msg}"
                );
            }
        }
    }
    Ok(())
}

/// `SafeTensors::from_bytes` on the whole input, then every tensor read.
pub fn safetensors(data: &[u8]) -> Outcome {
    let st =
        SafeTensors::from_bytes("fuzz.safetensors", data.to_vec()).map_err(|e| e.to_string())?;
    read_all(&st)
}

/// A sharded checkpoint: `join(index json, shard 1, shard 2)`; the shards are offered as
/// [`SHARDS`]` [0]` and `[1]` (an empty part is an absent shard).
pub fn sharded_index(data: &[u8]) -> Outcome {
    let parts = split(data, 3);
    let index = text(parts[0]);
    let shards: HashMap<String, Vec<u8>> = SHARDS
        .iter()
        .zip(&parts[1..])
        .filter(|(_, p)| !p.is_empty())
        .map(|(name, p)| ((*name).to_owned(), p.to_vec()))
        .collect();
    let ckpt = Checkpoint::from_index_bytes("fuzz/model.safetensors.index.json", &index, shards)
        .map_err(|e| e.to_string())?;
    for name in ckpt.names() {
        let t = ckpt.tensor(name);
        assert!(t.is_some(), "listed tensor `{name}` not found");
    }
    ckpt.shards().iter().try_for_each(read_all)
}

/// `config.json`: `OptConfig::from_json`, every derived size, and loading the tiny model's
/// weights with it (which must fail cleanly unless the config describes them; the outcome is
/// the config's).
pub fn opt_config(fx: &Fixtures, data: &[u8]) -> Outcome {
    let config = OptConfig::from_json(&text(data), Path::new("fuzz/config.json"))
        .map_err(|e| e.to_string())?;
    let _ = (
        config.head_dim(),
        config.position_rows(),
        config.has_projections(),
    );
    let tensors = config.decoder_tensors();
    let listed: usize = tensors
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert!(listed <= config.num_parameters());
    // Most configs do not describe the tiny weights: loading must then fail cleanly.
    if let Ok(weights) = OptWeights::load(&fx.tiny_checkpoint, &config) {
        assert_eq!(weights.num_parameters(), config.num_parameters());
    }
    Ok(())
}

/// A JSONL file: the first byte picks the options (bits 0-1: `max_len` 2048/16/1/0, bit 2:
/// refuse overflow, bits 3-4: special-token handling, bits 5-6: vocabulary bound none/8192/4,
/// bit 7: no tokenizer); the rest is the file.
pub fn jsonl(fx: &Fixtures, data: &[u8]) -> Outcome {
    let (&flags, file) = data.split_first().unwrap_or((&0, &[]));
    let options = JsonlOptions {
        max_len: [2048, 16, 1, 0][(flags & 3) as usize],
        overflow: if flags & 4 != 0 {
            Overflow::Refuse
        } else {
            Overflow::Truncate
        },
        special_text: [
            SpecialTokenText::Reject,
            SpecialTokenText::Literal,
            SpecialTokenText::Special,
            SpecialTokenText::Reject,
        ][(flags >> 3 & 3) as usize],
        vocab_size: [None, Some(8192), Some(4), None][(flags >> 5 & 3) as usize],
    };
    let tokenizer = (flags & 0x80 == 0).then_some(&fx.tokenizer);
    let ds = parse_jsonl(file, Path::new("fuzz.jsonl"), tokenizer, &options)
        .map_err(|e| e.to_string())?;
    for ex in &ds.examples {
        assert_eq!(ex.ids.len(), ex.loss_mask.len());
        assert!(ex.len() <= options.max_len, "kept an example over max_len");
    }
    assert_eq!(ds.examples.len(), ds.stats.examples);
    Ok(())
}

/// `tokenizer.json` through our loader (`Tokenizer::from_bytes`, EOS `</s>`), then our own
/// wrapper logic: encoding with and without special-token texts, the special-text scan, and a
/// JSONL text line encoded with the loaded tokenizer.
pub fn tokenizer(data: &[u8]) -> Outcome {
    let tok =
        Tokenizer::from_bytes("fuzz/tokenizer.json", data, "</s>").map_err(|e| e.to_string())?;
    let sample = "Hello </s> world <pad>!";
    let with = tok.encode(sample, true).map_err(|e| e.to_string())?;
    let without = tok
        .encode_literal(sample, false)
        .map_err(|e| e.to_string())?;
    let _ = (with.len(), without.len(), tok.find_special_text(sample));
    let _ = tok.decode(&with, false);
    let _ = (tok.vocab_size(), tok.special_prefix(), tok.special_suffix());
    let line = b"{\"prompt\": \"a b\", \"completion\": \" c\"}\n{\"text\": \"x y z\"}\n";
    for special_text in [SpecialTokenText::Literal, SpecialTokenText::Reject] {
        let options = JsonlOptions {
            special_text,
            ..JsonlOptions::default()
        };
        parse_jsonl(&line[..], Path::new("fuzz.jsonl"), Some(&tok), &options)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// An adapter directory for the tiny model: `join(adapter_config.json, adapter_model.safetensors)`.
pub fn adapter(fx: &Fixtures, data: &[u8]) -> Outcome {
    let parts = split(data, 2);
    let params = load_adapter_from_bytes(
        &PathBuf::from("fuzz-adapter"),
        &text(parts[0]),
        parts[1].to_vec(),
        &fx.tiny,
    )
    .map_err(|e| e.to_string())?;
    assert_eq!(params.layers.len(), fx.tiny.num_hidden_layers);
    for (name, m) in params.tensors() {
        assert_eq!(m.data.len(), m.rows * m.cols, "{name}");
    }
    Ok(())
}

/// For the cargo-fuzz targets that go through the tokenizer: libfuzzer-sys's panic hook
/// aborts on every panic, even one our code catches on purpose (the tokenizer loader turns the
/// `tokenizers` crate's panics into errors). This hook only prints, so that a panic is a finding
/// only when it escapes the target (libfuzzer-sys then aborts and reports it).
pub fn let_caught_panics_unwind() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
}
