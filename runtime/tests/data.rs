//! The data pipeline against the fixture tokenizer and the real data in `../shared` (no GPU).
//!
//! Files are found under `$LEXP_SHARED_DIR`, else `<repo>/../shared`; without them the tests
//! are skipped with a message (`LEXP_REQUIRE_SHARED=1` makes that a failure).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use lexp_runtime::data::{
    epoch_order, load_jsonl, pack, packing_efficiency, parse_jsonl, split_eval, split_eval_grouped,
    DataError, Dataset, EvalSize, Example, JsonlOptions, PackedBatch, Shape, SpecialTokenText,
    Tokenizer, IGNORE_INDEX,
};

mod common;

fn shared() -> PathBuf {
    let dir = common::shared_dir();
    assert!(
        dir.join("fixtures").is_dir(),
        "shared data not found at {} (set LEXP_SHARED_DIR)",
        dir.display()
    );
    dir
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_file(shared().join("fixtures/opt-tiny/tokenizer.json")).unwrap()
}

fn parse(tok: &Tokenizer, text: &str, options: &JsonlOptions) -> Result<Dataset, DataError> {
    parse_jsonl(text.as_bytes(), Path::new("mem.jsonl"), Some(tok), options)
}

/// The token's id as written in `tokenizer.json`'s `model.vocab`, read without the
/// `tokenizers` crate.
fn vocab_id(token: &str) -> u32 {
    let path = shared().join("fixtures/opt-tiny/tokenizer.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["model"]["vocab"][token].as_u64().unwrap() as u32
}

#[test]
fn fixture_tokenizer_matches_hf() {
    skip_without_shared!();
    let tok = tokenizer();
    // Reference ids: RUNTIME.md §5.1 test vectors, produced with HF `tokenizers` (Python) on
    // this tokenizer.json: `</s> H ell o Ġworld , Ġname [ The ĠE ag le ]`.
    let text = "Hello world, name[The Eagle]";
    let want = [2, 43, 461, 82, 1391, 15, 910, 62, 458, 435, 493, 298, 64];
    assert_eq!(tok.encode(text, true).unwrap(), want);
    assert_eq!(tok.encode("Hello", false).unwrap(), [43, 461, 82]);
    // The same ids straight from the file's vocabulary.
    let pieces = [
        "H", "ell", "o", "Ġworld", ",", "Ġname", "[", "The", "ĠE", "ag", "le", "]",
    ];
    let from_vocab: Vec<u32> = pieces.iter().map(|p| vocab_id(p)).collect();
    assert_eq!(from_vocab, want[1..]);
    // OPT conventions: `</s>` (2) is both the BOS the post-processor adds and the EOS.
    assert_eq!(tok.special_prefix(), [2]);
    assert!(tok.special_suffix().is_empty());
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.vocab_size(), 8192);
    assert_eq!(tok.token_to_id("<pad>"), Some(1));
    assert_eq!(tok.id_to_token(1391).as_deref(), Some("Ġworld"));
    assert_eq!(tok.decode(&want, true).unwrap(), text);
    assert_eq!(tok.decode(&want[..3], false).unwrap(), "</s>Hell");
    // A literal `</s>` in text is the special id for HF, plain text for `encode_literal`.
    assert!(tok.encode("a</s>b", false).unwrap().contains(&2));
    let literal = tok.encode_literal("a</s>b", true).unwrap();
    assert_eq!(literal[0], 2);
    assert!(!literal[1..].contains(&2));
    assert_eq!(tok.decode(&literal[1..], false).unwrap(), "a</s>b");
}

#[test]
fn tokenizer_errors_name_the_file() {
    skip_without_shared!();
    let missing = Path::new("/nonexistent/tokenizer.json");
    let err = Tokenizer::from_file(missing).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/tokenizer.json"), "{err}");
    let bad = std::env::temp_dir().join(format!("lexp-data-bad-{}.json", std::process::id()));
    std::fs::write(&bad, "{\"model\": 3}").unwrap();
    let err = Tokenizer::from_file(&bad).unwrap_err().to_string();
    std::fs::remove_file(&bad).unwrap();
    assert!(
        err.starts_with(&format!("cannot load tokenizer {}", bad.display())),
        "{err}"
    );
    let path = shared().join("fixtures/opt-tiny/tokenizer.json");
    let err = Tokenizer::from_file_with_eos(&path, "<|endoftext|>")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no EOS token `<|endoftext|>`"), "{err}");
}

#[test]
fn every_shape_parses_with_completion_only_masks() {
    skip_without_shared!();
    let tok = tokenizer();
    let enc = |s: &str, special| tok.encode(s, special).unwrap();
    let opts = JsonlOptions::default();
    let data = concat!(
        "{\"prompt\": \"name[The Eagle]\\n\", \"completion\": \"The Eagle is here.\"}\n",
        "{\"instruction\": \"Say hi.\", \"input\": \"\", \"output\": \"Hi!\"}\n",
        "{\"instruction\": \"Add.\", \"input\": \"2 and 3\", \"output\": \"5\"}\n",
        "{\"text\": \"Hello world\"}\n",
        "{\"context\": [13650, 2], \"completion\": [345, 2]}\n",
        "{\"context\": \"name[X]\\n\", \"completion\": \"X.\"}\n",
    );
    let ds = parse(&tok, data, &opts).unwrap();
    assert_eq!(ds.stats.by_shape, [2, 2, 1, 1]);
    let ex = &ds.examples;

    let prompt = enc("name[The Eagle]\n", true);
    let mut completion = enc("The Eagle is here.", false);
    completion.push(2);
    assert_eq!(ex[0].shape, Shape::PromptCompletion);
    assert_eq!(ex[0].ids, [prompt.clone(), completion.clone()].concat());
    assert_eq!(ex[0].ids[0], 2);
    let mask: Vec<bool> = (0..ex[0].len()).map(|i| i >= prompt.len()).collect();
    assert_eq!(ex[0].loss_mask, mask);
    assert_eq!(ex[0].num_targets(), completion.len());
    let labels = ex[0].labels();
    assert!(labels[..prompt.len()].iter().all(|&l| l == -100));
    assert_eq!(*labels.last().unwrap(), 2);

    assert_eq!(ex[1].shape, Shape::Alpaca);
    let alpaca = enc(
        "Below is an instruction that describes a task. Write a response that appropriately \
         completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:",
        true,
    );
    assert_eq!(
        ex[1].ids,
        [alpaca.clone(), enc("Hi!", false), vec![2]].concat()
    );
    assert_eq!(ex[1].num_targets(), ex[1].len() - alpaca.len());
    assert!(tok
        .decode(&ex[2].ids, true)
        .unwrap()
        .contains("### Input:\n2 and 3\n\n"));

    assert_eq!(ex[3].shape, Shape::Text);
    assert_eq!(ex[3].ids, [enc("Hello world", true), vec![2]].concat());
    assert!(!ex[3].loss_mask[0]);
    assert!(ex[3].loss_mask[1..].iter().all(|&m| m));

    assert_eq!(ex[4].shape, Shape::PreTokenized);
    assert_eq!(ex[4].ids, [13650, 2, 345, 2]);
    assert_eq!(ex[4].loss_mask, [false, false, true, true]);
    assert_eq!(
        ex[5].ids,
        [enc("name[X]\n", true), enc("X.", false), vec![2]].concat()
    );
}

#[test]
fn special_token_text_is_rejected_or_handled_by_option() {
    skip_without_shared!();
    let tok = tokenizer();
    let data = "{\"prompt\": \"a\\n\", \"completion\": \"b</s>c\"}\n";
    let err = parse(&tok, data, &JsonlOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("mem.jsonl:1: field `completion` contains the special token text `</s>`"),
        "{err}"
    );
    let special = JsonlOptions {
        special_text: SpecialTokenText::Special,
        ..Default::default()
    };
    let ids = &parse(&tok, data, &special).unwrap().examples[0].ids;
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 3);
    let literal = JsonlOptions {
        special_text: SpecialTokenText::Literal,
        ..Default::default()
    };
    let ids = &parse(&tok, data, &literal).unwrap().examples[0].ids;
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

#[test]
fn malformed_lines_report_file_and_line() {
    skip_without_shared!();
    let tok = tokenizer();
    let path = std::env::temp_dir().join(format!("lexp-data-bad-{}.jsonl", std::process::id()));
    let lines = "{\"prompt\": \"a\", \"completion\": \"b\"}\n\n{\"prompt\": \"a\"}\n";
    std::fs::write(&path, lines).unwrap();
    let err = load_jsonl(&path, Some(&tok), &JsonlOptions::default()).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        err.to_string(),
        format!("{}:3: missing field `completion`", path.display())
    );
    let err = parse(&tok, "{\"prompt\": \"a\", }\n", &JsonlOptions::default()).unwrap_err();
    assert!(
        err.to_string().starts_with("mem.jsonl:1: not valid JSON: "),
        "{err}"
    );
    let err = load_jsonl("/nonexistent/x.jsonl", None, &JsonlOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot read /nonexistent/x.jsonl: "),
        "{err}"
    );
}

/// Checks every invariant of a packing of `examples` in `order` under `budget`.
fn check_packing(examples: &[Example], order: &[usize], batches: &[PackedBatch], budget: usize) {
    let mut seen = Vec::new();
    for b in batches {
        assert!(b.num_tokens() <= budget && b.num_tokens() > 0);
        assert_eq!(b.cu_seqlens[0], 0);
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.num_tokens());
        assert_eq!(b.position_ids.len(), b.num_tokens());
        assert_eq!(b.targets.len(), b.num_tokens());
        for (s, w) in b.cu_seqlens.windows(2).enumerate() {
            let (lo, hi) = (w[0] as usize, w[1] as usize);
            let ex = &examples[b.examples[s]];
            assert_eq!(&b.input_ids[lo..hi], &ex.ids[..]);
            let pos: Vec<u32> = (0..(hi - lo) as u32).collect();
            assert_eq!(&b.position_ids[lo..hi], &pos[..]);
            assert_eq!(
                b.targets[hi - 1],
                IGNORE_INDEX,
                "last token of a sequence has no target"
            );
            for t in lo..hi - 1 {
                let want = if ex.loss_mask[t - lo + 1] {
                    b.input_ids[t + 1] as i32
                } else {
                    IGNORE_INDEX
                };
                assert_eq!(b.targets[t], want);
            }
        }
        // Closed only when the next example would not fit.
        seen.extend_from_slice(&b.examples);
    }
    assert_eq!(seen, order);
    for pair in batches.windows(2) {
        let next = examples[pair[1].examples[0]].len();
        assert!(pair[0].num_tokens() + next > budget);
    }
}

#[test]
fn e2e_end_to_end() {
    skip_without_shared!();
    let tok = tokenizer();
    let dir = shared().join("data");
    let opts = JsonlOptions {
        max_len: 1024,
        vocab_size: Some(8192),
        ..Default::default()
    };
    let train = load_jsonl(dir.join("e2e/train.jsonl"), Some(&tok), &opts).unwrap();
    let s = &train.stats;
    println!("e2e/train: {s:?}");
    // data/README.md: 4,672 pairs; RUNTIME §5.2: longest sequence 171 tokens.
    assert_eq!(
        (s.examples, s.blank, s.truncated, s.dropped),
        (4672, 0, 0, 0)
    );
    assert_eq!(s.by_shape, [4672, 0, 0, 0]);
    assert_eq!(s.max_len, 171);
    // RUNTIME §5.2: piecewise encoding equals encoding the concatenated text.
    let raw = std::fs::read_to_string(dir.join("e2e/train.jsonl")).unwrap();
    for (line, ex) in raw.lines().zip(&train.examples) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let joined = format!(
            "{}{}",
            v["prompt"].as_str().unwrap(),
            v["completion"].as_str().unwrap()
        );
        let mut want = tok.encode(&joined, true).unwrap();
        want.push(2);
        assert_eq!(ex.ids, want, "line {}", ex.line);
    }
    let groups: Vec<u64> = train.examples.iter().map(|e| e.group).collect();
    let distinct: HashSet<u64> = groups.iter().copied().collect();
    assert_eq!(distinct.len(), 547, "meaning representations (README)");

    let split = split_eval_grouped(&groups, EvalSize::Fraction(0.1), 17).unwrap();
    let eval_groups: HashSet<u64> = split.eval.iter().map(|&i| groups[i]).collect();
    assert_eq!(eval_groups.len(), 55);
    assert!(split
        .train
        .iter()
        .all(|&i| !eval_groups.contains(&groups[i])));
    assert_eq!(split.train.len() + split.eval.len(), 4672);

    let budget = 2048;
    let order = epoch_order(&split.train, 17, 0);
    let batches = pack(&train.examples, &order, budget).unwrap();
    check_packing(&train.examples, &order, &batches, budget);
    let targets: usize = batches.iter().map(PackedBatch::num_targets).sum();
    let want_targets: usize = split
        .train
        .iter()
        .map(|&i| train.examples[i].num_targets())
        .sum();
    assert_eq!(targets, want_targets);
    let eff = packing_efficiency(&batches, budget);
    println!(
        "train {} / eval {} examples, {} batches of <= {budget} tokens, {targets} targets, efficiency {eff:.3}",
        split.train.len(),
        split.eval.len(),
        batches.len()
    );
    assert!(eff > 0.95, "{eff}");

    let eval = load_jsonl(dir.join("e2e/eval.jsonl"), Some(&tok), &opts).unwrap();
    println!("e2e/eval: {:?}", eval.stats);
    assert_eq!(eval.stats.examples, 4693);
}

#[test]
fn e2e_paper_pretokenized() {
    skip_without_shared!();
    let dir = shared().join("data/e2e-paper");
    let opts = JsonlOptions {
        vocab_size: Some(50272),
        ..Default::default()
    };
    let ds = load_jsonl(dir.join("valid_opt.jsonl"), None, &opts).unwrap();
    println!("e2e-paper/valid_opt: {:?}", ds.stats);
    assert_eq!((ds.stats.examples, ds.stats.by_shape[3]), (4672, 4672));
    for ex in &ds.examples {
        let first_target = ex.loss_mask.iter().position(|&m| m).unwrap();
        assert_eq!(ex.ids[first_target - 1], 2, "context ends with EOS");
        assert_ne!(ex.ids[0], 2, "no leading BOS");
        assert_eq!(*ex.ids.last().unwrap(), 2);
        assert!(ex.len() - first_target <= 133);
    }
    // A file for the OPT vocabulary is caught when the model is the 8192-token fixture.
    let small = JsonlOptions {
        vocab_size: Some(8192),
        ..Default::default()
    };
    let err = load_jsonl(dir.join("valid_opt.jsonl"), None, &small)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("valid_opt.jsonl:1: token id 13650 is outside the vocabulary of 8192"),
        "{err}"
    );
}

#[test]
fn shuffling_and_splits_are_deterministic() {
    skip_without_shared!();
    let split = split_eval(1000, EvalSize::Count(100), 5).unwrap();
    assert_eq!(split, split_eval(1000, EvalSize::Count(100), 5).unwrap());
    let train: HashSet<usize> = split.train.iter().copied().collect();
    assert!(split.eval.iter().all(|i| !train.contains(i)));
    assert_eq!(train.len() + split.eval.len(), 1000);
    let a = epoch_order(&split.train, 5, 3);
    assert_eq!(a, epoch_order(&split.train, 5, 3));
    assert_ne!(a, epoch_order(&split.train, 6, 3));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, split.train);
}
