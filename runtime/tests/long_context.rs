//! Longer contexts than the checkpoint learned: the bundled opt-tiny (1024 learned positions)
//! with its position table interpolated to 4096 positions runs a 3000-token sequence on the
//! CPU model with a finite loss, below the uniform guess; without the extension the same batch
//! is refused with an error that says how to extend the table.

use lexp_runtime::checkpoint::{OptModel, PositionExtension};
use lexp_runtime::data::{PackedBatch, Tokenizer};
use lexp_runtime::model::{self, ModelError};
use std::path::{Path, PathBuf};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default/opt-tiny")
}

/// The first `n` tokens of the bundled E2E completions, one after the other.
fn tokens(n: usize) -> Vec<u32> {
    let tok = Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default/e2e/train.jsonl");
    let mut ids = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let text = v["completion"].as_str().unwrap_or_default();
        ids.extend(tok.encode(text, false).unwrap());
        if ids.len() >= n {
            break;
        }
    }
    assert!(ids.len() >= n, "the E2E slice has {} tokens", ids.len());
    ids.truncate(n);
    ids
}

/// One sequence: every token but the last predicts the next.
fn batch(ids: &[u32]) -> PackedBatch {
    let n = ids.len();
    let mut targets: Vec<i32> = ids[1..].iter().map(|&t| t as i32).collect();
    targets.push(lexp_runtime::data::IGNORE_INDEX);
    PackedBatch {
        input_ids: ids.to_vec(),
        position_ids: (0..n as u32).collect(),
        targets,
        cu_seqlens: vec![0, n as i32],
        examples: vec![0],
        ..Default::default()
    }
}

#[test]
fn opt_tiny_interpolated_to_4096_positions_runs_3000_tokens() {
    let mut m = OptModel::load(model_dir()).unwrap();
    assert_eq!(m.config.max_position_embeddings, 1024);
    let b = batch(&tokens(3000));
    let err = model::eval_loss(&m, None, &b)
        .err()
        .expect("position 1024 is past the table");
    assert!(
        matches!(err, ModelError::PositionOutOfRange { pos: 1024, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("--max-positions"), "{err}");

    // The first 1000 tokens with the learned table, for scale.
    let (short_sum, short_n) = model::eval_loss(&m, None, &batch(&tokens(1000))).unwrap();
    m.extend_positions(4096, PositionExtension::Interpolate)
        .unwrap();
    assert_eq!(m.config.max_position_embeddings, 4096);
    assert_eq!(m.weights.embed_positions.rows, 4098);
    let (sum, n) = model::eval_loss(&m, None, &b).unwrap();
    assert_eq!(n, 2999);
    let (loss, short) = (sum / n as f64, short_sum / short_n as f64);
    eprintln!(
        "opt-tiny, 3000 tokens at 4096 interpolated positions: loss {loss:.4}; \
         1000 tokens at the learned 1024: {short:.4}"
    );
    assert!(loss.is_finite());
    // Below the loss of a uniform guess over the vocabulary: the model still predicts text.
    let uniform = (m.config.vocab_size as f64).ln();
    assert!(loss < uniform, "loss {loss} vs uniform {uniform}");
}
