//! Time-boxed mutation fuzzing of every parser of outside data (issue 10, acceptance 1):
//! safetensors files, sharded indexes with their shards, `config.json`, JSONL data,
//! `tokenizer.json` (our loader and wrapper) and PEFT adapter directories.
//!
//! Each target starts from a seed corpus of valid inputs built from scratch and from the
//! bundled assets (`fuzz_parsers/corpus.rs`; every entry must be accepted), then runs
//! deterministic mutations of it (`fuzz_parsers/mutate.rs`) for `LEXP_FUZZ_SECS` seconds
//! (default 5) per target, at most `LEXP_FUZZ_ITERS` inputs (default 200000). Every input
//! must end in `Ok` or a clean error: a panic, an input slower than 2 s or a single allocation
//! over 256 MiB fails the test with the input's seed and hex (see `fuzz_parsers/harness.rs`).
//! The targets themselves are in `fuzz_parsers/targets.rs`, shared with the cargo-fuzz crate
//! in `fuzz/` for longer runs. The regression tests at the end pin the inputs with huge sizes
//! that used to crash, hang or allocate without bound.

mod fuzz_parsers {
    pub mod corpus;
    pub mod harness;
    pub mod mutate;
    pub mod targets;
}

use fuzz_parsers::corpus::*;
use fuzz_parsers::harness::{fuzz, peak_alloc, CapAlloc, Report, Settings, Target, ALLOC_CAP};
use fuzz_parsers::mutate::Kind;
use fuzz_parsers::targets::{self, join, SHARDS};
use lexp_runtime::checkpoint::SafeTensors;
use lexp_runtime::peft::LoraTarget;
use serde_json::Value;
use std::path::Path;

#[global_allocator]
static ALLOC: CapAlloc = CapAlloc;

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
    // Many tokens at the limit: refused once they hold more than MAX_ADDED_TOKENS_BYTES.
    let n = Tokenizer::MAX_ADDED_TOKENS_BYTES / Tokenizer::MAX_ADDED_TOKEN_BYTES + 1;
    let many = edited_tokenizer(|t| {
        let list = t["added_tokens"].as_array_mut().unwrap();
        let template = list[3].clone();
        for i in 0..n {
            let mut added = template.clone();
            added["id"] = Value::from(10_000 + i);
            added["content"] = Value::from(format!("{i:0>256}"));
            list.push(added);
        }
    });
    let want = format!("the {} added_tokens hold", n + 4);
    let t = std::time::Instant::now();
    let err = targets::tokenizer(&many).unwrap_err();
    assert!(err.contains(&want), "{err}");
    assert!(t.elapsed().as_secs_f64() < 2.0, "{:?}", t.elapsed());
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

/// The in-memory entry points the targets call behave as the file loaders they stand for:
/// same result on valid files, same error on a broken one.
#[test]
fn in_memory_entry_points_match_the_file_loaders() {
    use lexp_runtime::checkpoint::Checkpoint;
    use lexp_runtime::data::Tokenizer;
    use lexp_runtime::peft::adapter::{load_adapter, load_adapter_from_bytes};
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fuzz-io-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // Adapters: equal parameters, then an equal error once the config is broken.
    let fx = fixtures();
    let [config, weights] = adapter_corpus().swap_remove(1).try_into().unwrap();
    std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &weights).unwrap();
    let text = String::from_utf8(config).unwrap();
    let from_files = load_adapter(&dir, &fx.tiny).unwrap();
    assert_eq!(from_files.config.targets, LoraTarget::ALL);
    let in_memory = load_adapter_from_bytes(&dir, &text, weights.clone(), &fx.tiny).unwrap();
    assert_eq!(from_files, in_memory);
    let broken = text.replace("\"r\": 1", "\"r\": 0");
    assert_ne!(broken, text);
    std::fs::write(dir.join("adapter_config.json"), &broken).unwrap();
    let e1 = load_adapter(&dir, &fx.tiny).unwrap_err().to_string();
    let e2 = load_adapter_from_bytes(&dir, &broken, weights, &fx.tiny)
        .unwrap_err()
        .to_string();
    assert_eq!(e1, e2);
    assert!(e1.contains("`r` must be a positive integer"), "{e1}");

    // Sharded checkpoints: the same tensors, then the same error without the second shard.
    let [index, s1, s2] = sharded_corpus().swap_remove(0).try_into().unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::write(&index_path, &index).unwrap();
    std::fs::write(dir.join(SHARDS[0]), &s1).unwrap();
    std::fs::write(dir.join(SHARDS[1]), &s2).unwrap();
    let index = String::from_utf8(index).unwrap();
    let shards = |both: bool| {
        let mut m = std::collections::HashMap::from([(SHARDS[0].to_owned(), s1.clone())]);
        if both {
            m.insert(SHARDS[1].to_owned(), s2.clone());
        }
        m
    };
    let a = Checkpoint::open_index(&index_path).unwrap();
    let b = Checkpoint::from_index_bytes(&index_path, &index, shards(true)).unwrap();
    assert_eq!(a.names(), b.names());
    assert_eq!(a.shards().len(), 2);
    for name in a.names() {
        let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!(
            (ta.file(), ta.shape(), ta.bytes()),
            (tb.file(), tb.shape(), tb.bytes())
        );
    }
    std::fs::remove_file(dir.join(SHARDS[1])).unwrap();
    let e1 = Checkpoint::open_index(&index_path).unwrap_err().to_string();
    let e2 = Checkpoint::from_index_bytes(&index_path, &index, shards(false))
        .unwrap_err()
        .to_string();
    assert_eq!(e1, e2);
    assert!(
        e1.contains(&format!("shard `{}`, which does not exist", SHARDS[1])),
        "{e1}"
    );

    // Tokenizers: the same facts and encodings.
    let path = assets().join("opt-tiny/tokenizer.json");
    let a = Tokenizer::from_file(&path).unwrap();
    let b = Tokenizer::from_bytes(&path, &read("opt-tiny/tokenizer.json"), "</s>").unwrap();
    assert_eq!(
        (a.eos_id(), a.special_prefix(), a.vocab_size()),
        (b.eos_id(), b.special_prefix(), b.vocab_size())
    );
    let text = "The Eagle is a coffee shop near Burger King </s>";
    assert_eq!(a.encode(text, true).unwrap(), b.encode(text, true).unwrap());
    assert_eq!(
        a.encode_literal(text, false).unwrap(),
        b.encode_literal(text, false).unwrap()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The harness's guards catch what they are for: a panic, a slow input and an oversized
/// allocation each fail the run, naming the input by a seed that regenerates the saved bytes.
#[test]
fn the_harness_reports_panics_hangs_and_huge_allocations() {
    use fuzz_parsers::mutate::Mutator;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let settings = Settings {
        time: std::time::Duration::from_secs(10),
        iters: 5,
        seed: 7,
        replay: None,
    };
    let corpus = vec![vec![b"{\"a\": 12}".to_vec()]];
    let failing = |what: &str, run: &(dyn Fn(&[u8]) -> Result<(), String> + Sync)| -> String {
        let target = Target {
            name: "selftest",
            kinds: vec![Kind::Json],
            corpus: corpus.clone(),
            encode: first,
            run,
        };
        let payload = catch_unwind(AssertUnwindSafe(|| fuzz(&target, settings)))
            .expect_err(&format!("{what} was not reported"));
        let msg = payload
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(msg.contains(what), "{msg}");
        // The seed printed regenerates the input saved next to it.
        let seed = msg.split("input seed 0x").nth(1).expect("a seed")[..16].to_owned();
        let seed = u64::from_str_radix(&seed, 16).unwrap();
        let saved = msg
            .split("saved to ")
            .nth(1)
            .unwrap()
            .lines()
            .next()
            .unwrap();
        let input = Mutator::new(&corpus, &[Kind::Json]).input(seed);
        assert_eq!(std::fs::read(saved).unwrap(), input[0], "{msg}");
        msg
    };
    let is_seed = |d: &[u8]| d == corpus[0][0].as_slice();
    failing("panicked: boom", &|d| {
        assert!(is_seed(d), "boom");
        Ok(())
    });
    failing("(a hang: over 2s)", &|d| {
        if !is_seed(d) {
            std::thread::sleep(std::time::Duration::from_millis(2100));
        }
        Ok(())
    });
    let msg = failing("made a single allocation of 314572800 bytes", &|d| {
        if !is_seed(d) {
            std::hint::black_box(vec![0u8; 300 << 20]);
        }
        Ok(())
    });
    assert!(msg.contains("hex: "), "{msg}");
}
