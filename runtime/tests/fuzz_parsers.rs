//! Time-boxed mutation fuzzing of every parser of outside data (issue 10, acceptance 1):
//! safetensors files, sharded indexes with their shards, `config.json`, JSONL data,
//! `tokenizer.json` (our loader and wrapper) and PEFT adapter directories.
//!
//! Each target starts from a seed corpus of valid inputs built here and from the bundled assets
//! (every entry must be accepted), then runs deterministic mutations of it (see
//! `fuzz_parsers/mutate.rs`) for `LEXP_FUZZ_SECS` seconds (default 5) per target. Every input
//! must end in `Ok` or a clean error: a panic, an input slower than 2 s or a single allocation
//! over 256 MiB fails the test with the input's seed and hex (see `fuzz_parsers/harness.rs`).
//! The targets themselves are in `fuzz_parsers/targets.rs`, shared with the cargo-fuzz crate
//! in `fuzz/` for longer runs. The regression tests at the end pin the inputs with huge sizes
//! that used to crash, hang or allocate without bound.

mod fuzz_parsers {
    pub mod harness;
    pub mod mutate;
    pub mod targets;
}

use fuzz_parsers::harness::{fuzz, peak_alloc, CapAlloc, Report, Settings, Target, ALLOC_CAP};
use fuzz_parsers::mutate::Kind;
use fuzz_parsers::targets::{self, join, Fixtures, SHARDS};
use lexp_runtime::checkpoint::{writer, Dtype, SafeTensors, WriteTensor};
use lexp_runtime::peft::{save_adapter, LoraConfig, LoraParams, LoraTarget};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[global_allocator]
static ALLOC: CapAlloc = CapAlloc;

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default")
}

fn fixtures() -> &'static Fixtures {
    static FX: OnceLock<Fixtures> = OnceLock::new();
    FX.get_or_init(|| Fixtures::load(&assets()))
}

fn read(rel: &str) -> Vec<u8> {
    let path = assets().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parts as they are: for single-part targets.
fn first(parts: &[Vec<u8>]) -> Vec<u8> {
    parts[0].clone()
}

/// Parts joined with length prefixes: for multi-file targets.
fn joined(parts: &[Vec<u8>]) -> Vec<u8> {
    join(&parts.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

/// Flags byte followed by the file: for the JSONL target.
fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// Asserts what every fuzzing run must show: enough inputs ran and, once a thousand did, some
/// mutated inputs were accepted, at least ten different errors came back, and among them one
/// containing each of `reached` (the deeper checks the mutations must get to, past the JSON
/// syntax). `LEXP_FUZZ_VERBOSE=1` lists every error with its count.
fn check(report: &Report, settings: Settings, reached: &[&str]) {
    if settings.replay.is_some() {
        return;
    }
    if std::env::var_os("LEXP_FUZZ_VERBOSE").is_some() {
        let mut errors: Vec<_> = report.errors.iter().collect();
        errors.sort_by(|a, b| b.1.cmp(a.1));
        for (e, n) in &errors {
            eprintln!("{n:8} {e}");
        }
    }
    assert!(
        report.executed >= settings.min_inputs(),
        "only {} inputs in {:?} (at least {} expected)",
        report.executed,
        settings.time,
        settings.min_inputs()
    );
    if report.executed >= 1000 {
        assert!(report.ok > 0, "no mutated input was accepted");
        assert!(
            report.errors.len() >= 10,
            "only {} distinct errors: {:#?}",
            report.errors.len(),
            report.errors
        );
        for want in reached {
            assert!(
                report.errors.keys().any(|e| e.contains(want)),
                "no error contains {want:?} after {} inputs (LEXP_FUZZ_VERBOSE=1 lists them)",
                report.executed
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Seed corpora.

fn tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u8) -> WriteTensor<'static> {
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

fn file(tensors: &[WriteTensor<'_>], metadata: &[(&str, &str)]) -> Vec<u8> {
    let meta: BTreeMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    writer::to_bytes(tensors, &meta).expect("valid tensors")
}

/// Small valid safetensors files: mixed dtypes with metadata, every dtype, no tensors, a
/// scalar and an empty tensor, the tiny model, and the 7 MB opt-tiny fixture.
fn safetensors_corpus() -> Vec<Vec<Vec<u8>>> {
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
fn sharded_corpus() -> Vec<Vec<Vec<u8>>> {
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
fn config_corpus() -> Vec<Vec<Vec<u8>>> {
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
fn jsonl_corpus() -> Vec<Vec<Vec<u8>>> {
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
fn tokenizer_corpus() -> Vec<Vec<Vec<u8>>> {
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
fn adapter_corpus() -> Vec<Vec<Vec<u8>>> {
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

// ---------------------------------------------------------------------------------------------
// Fuzzing runs, one per parser.

#[test]
fn fuzz_safetensors() {
    let settings = Settings::from_env();
    let target = Target {
        name: "safetensors",
        kinds: vec![Kind::Safetensors],
        corpus: safetensors_corpus(),
        encode: first,
        run: &targets::safetensors,
    };
    check(
        &fuzz(&target, settings),
        settings,
        &[
            "exceeds the limit",
            "runs past the end",
            "invalid header",
            "trailing bytes",
            "exceed the file's data section",
            "bytes, but data_offsets",
            "unknown dtype",
        ],
    );
}

#[test]
fn fuzz_sharded_index() {
    let settings = Settings::from_env();
    let target = Target {
        name: "sharded_index",
        kinds: vec![Kind::Json, Kind::Safetensors, Kind::Safetensors],
        corpus: sharded_corpus(),
        encode: joined,
        run: &targets::sharded_index,
    };
    check(
        &fuzz(&target, settings),
        settings,
        &[
            "is not in the file, but",
            "does not exist",
            "trailing bytes",
            "model.safetensors.index.json: not valid JSON",
        ],
    );
}

#[test]
fn fuzz_opt_config() {
    let settings = Settings::from_env();
    let fx = fixtures();
    let target = Target {
        name: "opt_config",
        kinds: vec![Kind::Json],
        corpus: config_corpus(),
        encode: first,
        run: &|data| targets::opt_config(fx, data),
    };
    check(
        &fuzz(&target, settings),
        settings,
        &["invalid config", "is not divisible", "more than the limit"],
    );
}

#[test]
fn fuzz_jsonl() {
    let settings = Settings::from_env();
    let fx = fixtures();
    let target = Target {
        name: "jsonl",
        kinds: vec![Kind::Flags, Kind::Lines],
        corpus: jsonl_corpus(),
        encode: concat,
        run: &|data| targets::jsonl(fx, data),
    };
    check(
        &fuzz(&target, settings),
        settings,
        &[
            "needs a tokenizer",
            "outside the vocabulary",
            "truncation is off",
            "missing field",
            "special token text",
            "is not a token id",
        ],
    );
}

#[test]
fn fuzz_tokenizer() {
    let settings = Settings::from_env();
    let target = Target {
        name: "tokenizer",
        kinds: vec![Kind::Json],
        corpus: tokenizer_corpus(),
        encode: first,
        run: &targets::tokenizer,
    };
    check(
        &fuzz(&target, settings),
        settings,
        &["cannot load tokenizer fuzz/tokenizer.json"],
    );
}

#[test]
fn fuzz_adapter() {
    let settings = Settings::from_env();
    let fx = fixtures();
    let target = Target {
        name: "adapter",
        kinds: vec![Kind::Json, Kind::Safetensors],
        corpus: adapter_corpus(),
        encode: joined,
        run: &|data| targets::adapter(fx, data),
    };
    check(
        &fuzz(&target, settings),
        settings,
        &[
            "is not supported",
            "maps to no LoRA",
            "only some layers",
            "is not a probability",
            "invalid header",
            "trailing bytes",
        ],
    );
}

// ---------------------------------------------------------------------------------------------
// Regressions and huge sizes: inputs that crashed, hung or could allocate without bound.

/// Runs `run` on `input`, which must be rejected with an error containing `want`, within a
/// second and without any single allocation over 1 MiB (the inputs are small: a parser that
/// trusts a size field would allocate far more).
fn rejects(what: &str, run: impl FnOnce() -> Result<(), String>, want: &str) {
    let t = std::time::Instant::now();
    let (result, peak) = peak_alloc(run);
    let elapsed = t.elapsed();
    let msg = result.expect_err(what);
    assert!(
        msg.contains(want),
        "{what}: {msg:?} should contain {want:?}"
    );
    assert!(
        peak < 1 << 20,
        "{what}: a single allocation of {peak} bytes"
    );
    assert!(peak < ALLOC_CAP);
    assert!(elapsed.as_secs_f64() < 1.0, "{what}: took {elapsed:?}");
}

/// A safetensors file with `header` and `data`, the length field set to the header's length.
fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

#[test]
fn safetensors_with_huge_sizes_are_rejected_without_allocating() {
    let len_only = |len: u64, rest: &[u8], want: &str| {
        let mut f = len.to_le_bytes().to_vec();
        f.extend_from_slice(rest);
        rejects(&format!("length {len}"), || targets::safetensors(&f), want);
    };
    len_only(u64::MAX, b"{}", "exceeds the limit");
    len_only(1 << 63, b"{}", "exceeds the limit");
    len_only(100_000_000, b"{}      ", "runs past the end of the file");
    len_only(u64::MAX - 7, b"", "exceeds the limit");
    rejects(
        "short",
        || targets::safetensors(&[0xff; 7]),
        "shorter than the 8-byte",
    );
    let entry = |dtype: &str, shape: &str, offsets: &str| {
        format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
    };
    let cases = [
        (
            entry("F32", "[18446744073709551615]", "[0,4]"),
            "overflows the byte count",
        ),
        (
            entry("F32", "[4294967296,4294967296]", "[0,4]"),
            "overflows the element count",
        ),
        (
            entry("U8", "[2305843009213693951]", "[0,2305843009213693951]"),
            "exceed the file's data section",
        ),
        (
            entry("F32", "[2]", "[0,18446744073709551615]"),
            "need 8 bytes",
        ),
        (
            entry("F32", "[2]", "[18446744073709551615,0]"),
            "end before they begin",
        ),
        (
            entry("F32", "[18446744073709551616]", "[0,4]"),
            "non-negative integers",
        ),
        (entry("F32", "[-1]", "[0,4]"), "non-negative integers"),
        (entry("F4", "[3]", "[0,2]"), "not a whole number of bytes"),
    ];
    for (header, want) in cases {
        let f = st_file(&header, &[0; 4]);
        rejects(&header, || targets::safetensors(&f), want);
    }
    // A zero dimension makes any other dimension harmless: an empty tensor, accepted.
    let f = st_file(&entry("U8", "[0,18446744073709551615]", "[0,0]"), &[]);
    let st = SafeTensors::from_bytes("zero.safetensors", f).unwrap();
    let t = st.get("t").unwrap();
    assert_eq!((t.numel(), t.bytes().len()), (0, 0));
    let msg = t.to_f32().unwrap_err().to_string();
    assert!(msg.contains("dtype U8 cannot be loaded as f32"), "{msg}");
}

#[test]
fn configs_indexes_jsonl_and_adapters_with_huge_sizes_are_rejected() {
    let fx = fixtures();
    for (json, want) in [
        (
            r#"{"vocab_size": 9223372036854775807}"#,
            "more than the limit",
        ),
        (
            r#"{"max_position_embeddings": 18446744073709551615}"#,
            "more than 2^64",
        ),
        (r#"{"num_hidden_layers": 4294967296}"#, "is more than 4096"),
        (r#"{"vocab_size": 18446744073709551616}"#, "invalid config"),
    ] {
        rejects(json, || targets::opt_config(fx, json.as_bytes()), want);
    }
    let index = r#"{"metadata": {"total_size": 18446744073709551615},
        "weight_map": {"a": "../model-00001-of-00002.safetensors"}}"#;
    rejects(
        index,
        || targets::sharded_index(&join(&[index.as_bytes(), b"", b""])),
        "is not a file name",
    );
    for (line, want) in [
        (
            "{\"context\": [4294967296], \"completion\": [2]}",
            "`context`[0] is not a token id",
        ),
        (
            "{\"context\": [1], \"completion\": [18446744073709551616]}",
            "not a token id",
        ),
        (
            "{\"context\": [1], \"completion\": [1e999]}",
            "not valid JSON",
        ),
    ] {
        let input = [&[0x80u8][..], line.as_bytes()].concat();
        rejects(line, || targets::jsonl(fx, &input), want);
    }
    let weights = file(&[], &[]);
    for (config, want) in [
        (
            r#"{"peft_type": "LORA", "r": 18446744073709551615}"#,
            "missing tensor",
        ),
        (
            r#"{"peft_type": "LORA", "r": 18446744073709551616}"#,
            "`r` must be a positive integer",
        ),
        (
            r#"{"peft_type": "LORA", "lora_alpha": 1e300}"#,
            "lora_alpha inf is not finite",
        ),
        (
            r#"{"peft_type": "LORA", "layers_to_transform": [18446744073709551615]}"#,
            "only some layers",
        ),
    ] {
        let input = join(&[config.as_bytes(), &weights]);
        rejects(config, || targets::adapter(fx, &input), want);
    }
}

/// The small fixture tokenizer with `edit` applied to its JSON.
fn edited_tokenizer(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut t: Value = serde_json::from_slice(&tokenizer_corpus()[0][0]).unwrap();
    edit(&mut t);
    serde_json::to_vec(&t).unwrap()
}

/// Regression (fuzzing): an added token of 70 000 `a`s made the `tokenizers` crate build its
/// Aho-Corasick matcher for minutes (quadratic in the token's length); the loader now refuses
/// added tokens over `Tokenizer::MAX_ADDED_TOKEN_BYTES` before handing the file over.
#[test]
fn tokenizer_with_a_huge_added_token_is_rejected() {
    use lexp_runtime::data::Tokenizer;
    let long = |n: usize| {
        edited_tokenizer(|t| t["added_tokens"][1]["content"] = Value::from("a".repeat(n)))
    };
    let huge = long(70_000);
    rejects(
        "70 kB added token",
        || targets::tokenizer(&huge),
        "added_tokens[1] is 70000 bytes long",
    );
    let at_limit = long(Tokenizer::MAX_ADDED_TOKEN_BYTES);
    let t = std::time::Instant::now();
    targets::tokenizer(&at_limit).unwrap();
    assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
    let tok = Tokenizer::from_bytes("t.json", &at_limit, "</s>").unwrap();
    let id = tok.token_to_id(&"a".repeat(Tokenizer::MAX_ADDED_TOKEN_BYTES));
    assert!(id.is_some(), "the long token is in the vocabulary");
}

/// Regression (fuzzing): a `decoder` the `tokenizers` crate cannot read as JSON (here a lone
/// surrogate escape; the fuzzer found an invalid UTF-8 byte) hit an `expect("Helper")` inside
/// the crate and panicked; the loader turns it into an error naming the file.
#[test]
fn tokenizer_crate_panics_become_errors() {
    let good = String::from_utf8(edited_tokenizer(|_| {})).unwrap();
    let bad = good.replacen("\"decoder\":{", "\"decoder\":{\"x\":\"\\ud800\",", 1);
    assert_ne!(good, bad);
    let err =
        lexp_runtime::data::Tokenizer::from_bytes("dir/tokenizer.json", bad.as_bytes(), "</s>")
            .unwrap_err()
            .to_string();
    assert!(
        err.starts_with("cannot load tokenizer dir/tokenizer.json: the tokenizers crate failed"),
        "{err}"
    );
}
