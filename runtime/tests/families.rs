//! Forward parity of the GPT-2 and LLaMA-style families with transformers (RUNTIME.md §6,
//! §7): for each model directory under `tests/parity/families/` (a small random-weight
//! checkpoint and its `reference.json`, written on the GPU machine by
//! `bench/parity/families_reference.py`, see `bench/parity/README.md`), our loader reads the
//! checkpoint, our f32 CPU forward runs the reference's packed batch, and every logit must be
//! within 1e-4 (absolute, RUNTIME.md §7.2) of transformers' f32 logits. The logits reach about
//! 20 and the errors seen are about 1e-5 (transformers 5.17 on an H200, 2026-11-29).
//!
//! A missing reference is a failure, not a skip: the message names the script to run.

use lexp_runtime::data::PackedBatch;
use lexp_runtime::families::{Gpt2Model, LlamaModel};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The models the script writes (`CONFIGS` in `families_reference.py`).
const EXPECTED: [&str; 4] = [
    "gpt2-tied",
    "gpt2-inverse-layer",
    "llama-gqa",
    "llama-relu-bias",
];

/// Max abs error allowed over every logit (RUNTIME.md §7.2, f32 forward).
const TOLERANCE: f64 = 1e-4;

const REGENERATE: &str = "run `python3 bench/parity/families_reference.py` on the GPU machine \
     (torch + transformers 5.x; see bench/parity/README.md) and commit what it writes to \
     runtime/tests/parity/families/";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/parity/families")
}

fn ints(v: &Value, what: &str, file: &Path) -> Vec<i64> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
        .unwrap_or_else(|| panic!("{}: `{what}` is not an integer array", file.display()))
}

/// Checks the model in `dir` against its `reference.json`.
fn check(dir: &Path) {
    let file = dir.join("reference.json");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}; {REGENERATE}", file.display()));
    let r: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", file.display()));
    assert_eq!(
        r["schema"],
        "lexp-families-parity-v1",
        "{}: unknown schema",
        file.display()
    );
    let input = &r["input"];
    let batch = PackedBatch {
        input_ids: ints(&input["input_ids"], "input.input_ids", &file)
            .into_iter()
            .map(|x| x as u32)
            .collect(),
        position_ids: ints(&input["position_ids"], "input.position_ids", &file)
            .into_iter()
            .map(|x| x as u32)
            .collect(),
        targets: Vec::new(),
        cu_seqlens: ints(&input["cu_seqlens"], "input.cu_seqlens", &file)
            .into_iter()
            .map(|x| x as i32)
            .collect(),
        examples: Vec::new(),
    };
    let family = r["family"].as_str().unwrap_or_default();
    let got = match family {
        "gpt2" => Gpt2Model::load(dir).and_then(|m| m.logits(&batch)),
        "llama" => LlamaModel::load(dir).and_then(|m| m.logits(&batch)),
        other => panic!("{}: unknown family `{other}`", file.display()),
    }
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));

    let rows = r["logits"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `logits` array", file.display()));
    let t = batch.num_tokens();
    assert_eq!(rows.len(), t, "{}: logits rows vs tokens", file.display());
    let v = got.len() / t;
    let (mut worst, mut at, mut scale) = (0.0f64, (0, 0), 0.0f64);
    for (i, row) in rows.iter().enumerate() {
        let row = row.as_array().expect("a logits row is an array");
        assert_eq!(
            row.len(),
            v,
            "{}: row {i} has {} logits, we have {v}",
            file.display(),
            row.len()
        );
        for (j, want) in row.iter().enumerate() {
            let want = want.as_f64().expect("a logit is a number");
            let err = (f64::from(got[i * v + j]) - want).abs();
            scale = scale.max(want.abs());
            if err > worst {
                (worst, at) = (err, (i, j));
            }
        }
    }
    let limit = TOLERANCE;
    eprintln!(
        "{}: {t} tokens × {v} logits, max abs error {worst:.2e} at (row {}, col {}), \
         max |logit| {scale:.3}, limit {limit:.2e} (transformers {})",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        at.0,
        at.1,
        r["versions"]["transformers"]
    );
    assert!(
        worst <= limit,
        "{}: logits differ from transformers by {worst:e} at row {} col {} (limit {limit:e})",
        dir.display(),
        at.0,
        at.1
    );
}

fn check_named(name: &str) {
    let dir = root().join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "{}: no reference.json yet; {REGENERATE}",
        dir.display()
    );
    check(&dir);
}

#[test]
fn gpt2_tied_matches_transformers() {
    check_named("gpt2-tied");
}

#[test]
fn gpt2_inverse_layer_untied_gelu_matches_transformers() {
    check_named("gpt2-inverse-layer");
}

#[test]
fn llama_gqa_matches_transformers() {
    check_named("llama-gqa");
}

#[test]
fn llama_relu_bias_tied_head_dim_matches_transformers() {
    check_named("llama-relu-bias");
}

/// Any other model directory (one added to the script later) is checked too, and a
/// directory without its reference fails.
#[test]
fn every_other_reference_directory_matches() {
    let Ok(entries) = std::fs::read_dir(root()) else {
        panic!("{}: missing; {REGENERATE}", root().display());
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            !EXPECTED.contains(&name.as_ref())
        })
        .collect();
    dirs.sort();
    for dir in dirs {
        check(&dir);
    }
}
