//! JSONL training files → [`Example`]s with completion-only loss masks (RUNTIME §5.2).
//!
//! One JSON object per line; blank lines are skipped; extra fields are ignored. The shape is
//! chosen per line by its fields:
//!
//! | fields | sequence | loss on |
//! |---|---|---|
//! | `prompt`, `completion` (strings; `context` is accepted for `prompt`) | `encode(prompt, true) ++ encode(completion, false) ++ [eos]` | completion + EOS |
//! | `instruction`, `output`, optional `input` (Alpaca) | prompt = [`ALPACA_PROMPT`] (or [`ALPACA_PROMPT_NO_INPUT`] when `input` is empty), completion = `output` | completion + EOS |
//! | `text` | `encode(text, true) ++ [eos]` | every token after the special prefix |
//! | `context`, `completion` (arrays of ids) | `context ++ completion`, as given | completion |
//!
//! Pre-tokenized ids are used literally: no BOS is added and no EOS appended (the paper's
//! `e2e-paper` files already end both fields with EOS 2). They need no tokenizer.
//!
//! Sequences longer than [`JsonlOptions::max_len`] are **truncated by default** (keeping the
//! start, with a `tracing` warning naming `file:line`); [`Overflow::Refuse`] makes them errors.
//! A truncated example left with no completion token to learn from is dropped (also warned).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{DataError, Result, Tokenizer};

/// Stanford Alpaca's prompt for examples with an `input`; the completion is `output`.
pub const ALPACA_PROMPT: &str = "Below is an instruction that describes a task, paired with an \
input that provides further context. Write a response that appropriately completes the \
request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

/// Stanford Alpaca's prompt for examples whose `input` is missing or empty.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write \
a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n\
### Response:";

/// What to do with a sequence longer than [`JsonlOptions::max_len`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Keep the first `max_len` tokens and warn (the default).
    #[default]
    Truncate,
    /// Fail with a `file:line` error.
    Refuse,
}

/// What to do when a text field contains a special token's text, such as a literal `</s>`
/// (HF would encode it as the special id, RUNTIME §5.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpecialTokenText {
    /// Fail with a `file:line` error (the default: the data almost certainly did not mean it).
    #[default]
    Reject,
    /// Tokenize it as ordinary text ([`Tokenizer::encode_literal`]).
    Literal,
    /// Do what HF does: it becomes the special id.
    Special,
}

/// Options of [`load_jsonl`].
#[derive(Clone, Debug)]
pub struct JsonlOptions {
    /// Longest sequence kept, in tokens (at most the model's position count and the packing
    /// budget). Default 2048, OPT's context length.
    pub max_len: usize,
    /// Truncate (default) or refuse longer sequences.
    pub overflow: Overflow,
    /// Handling of special-token texts inside text fields.
    pub special_text: SpecialTokenText,
    /// If set, every id must be below it (the model's vocabulary); catches pre-tokenized files
    /// made for another vocabulary.
    pub vocab_size: Option<usize>,
}

impl Default for JsonlOptions {
    fn default() -> Self {
        JsonlOptions {
            max_len: 2048,
            overflow: Overflow::default(),
            special_text: SpecialTokenText::default(),
            vocab_size: None,
        }
    }
}

/// The line shapes [`load_jsonl`] understands (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `{"prompt": str, "completion": str}`.
    PromptCompletion,
    /// `{"instruction": str, "input": str?, "output": str}`.
    Alpaca,
    /// `{"text": str}`.
    Text,
    /// `{"context": [ids], "completion": [ids]}`.
    PreTokenized,
}

/// One training sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the whole sequence (BOS, prompt, completion, EOS).
    pub ids: Vec<u32>,
    /// Per token: `true` if it belongs to the completion (EOS included), i.e. it is a target
    /// of the position before it. Same length as `ids`. HF's `labels` are `ids` where this is
    /// true and -100 elsewhere ([`Example::labels`]).
    pub loss_mask: Vec<bool>,
    /// The 1-based line of the source file.
    pub line: usize,
    /// Which shape the line had.
    pub shape: Shape,
    /// Hash of the prompt ids (of all ids for `text`): examples sharing a prompt (E2E has ~8.5
    /// references per meaning representation) share it, for [`split_eval_grouped`](super::split_eval_grouped).
    pub group: u64,
}

impl Example {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the example has no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of positions with a target in the loss: masked tokens after the first (the
    /// first token is never predicted).
    pub fn num_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }

    /// HF-style labels: the id where the mask is set, -100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        self.ids
            .iter()
            .zip(&self.loss_mask)
            .map(|(&id, &m)| if m { i64::from(id) } else { -100 })
            .collect()
    }
}

/// Counts from loading one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Lines read, blank ones included.
    pub lines: usize,
    /// Blank lines skipped.
    pub blank: usize,
    /// Examples kept.
    pub examples: usize,
    /// Examples cut to `max_len` (kept ones only).
    pub truncated: usize,
    /// Examples dropped because truncation left no target.
    pub dropped: usize,
    /// Tokens over the kept examples.
    pub tokens: usize,
    /// Loss targets over the kept examples.
    pub targets: usize,
    /// Longest kept example, in tokens.
    pub max_len: usize,
    /// Kept examples per shape: prompt/completion, Alpaca, text, pre-tokenized.
    pub by_shape: [usize; 4],
}

/// A loaded JSONL file.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The file, as given.
    pub path: PathBuf,
    /// Its examples, in file order.
    pub examples: Vec<Example>,
    /// Counts.
    pub stats: LoadStats,
}

/// Reads and tokenizes the JSONL file at `path`. `tokenizer` may be `None` for files that are
/// entirely pre-tokenized; a text line then fails with a `file:line` error.
pub fn load_jsonl(
    path: impl AsRef<Path>,
    tokenizer: Option<&Tokenizer>,
    options: &JsonlOptions,
) -> Result<Dataset> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(std::io::BufReader::new(file), path, tokenizer, options)
}

/// Like [`load_jsonl`] over any reader; `name` is the path used in messages.
pub fn parse_jsonl(
    mut reader: impl BufRead,
    name: &Path,
    tokenizer: Option<&Tokenizer>,
    options: &JsonlOptions,
) -> Result<Dataset> {
    let mut stats = LoadStats::default();
    let mut examples = Vec::new();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| DataError::Io {
                path: name.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        stats.lines += 1;
        let line_no = stats.lines;
        let fail = |message: String| DataError::Line {
            path: name.to_path_buf(),
            line: line_no,
            message,
        };
        let mut bytes = buf.as_slice();
        if line_no == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|e| fail(format!("not valid UTF-8: {e}")))?
            .trim();
        if text.is_empty() {
            stats.blank += 1;
            continue;
        }
        let mut ex = parse_line(text, line_no, tokenizer, options).map_err(fail)?;
        if let Some(vocab) = options.vocab_size {
            if let Some(&id) = ex.ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(fail(format!(
                    "token id {id} is outside the vocabulary of {vocab}"
                )));
            }
        }
        if ex.len() > options.max_len {
            let len = ex.len();
            if options.overflow == Overflow::Refuse {
                return Err(fail(format!(
                    "sequence has {len} tokens, more than the maximum of {} (truncation is off)",
                    options.max_len
                )));
            }
            ex.ids.truncate(options.max_len);
            ex.loss_mask.truncate(options.max_len);
            if ex.num_targets() == 0 {
                tracing::warn!(
                    "{}:{line_no}: dropped: {len} tokens, and the first {} hold no completion token",
                    name.display(),
                    options.max_len
                );
                stats.dropped += 1;
                continue;
            }
            tracing::warn!(
                "{}:{line_no}: truncated from {len} to {} tokens",
                name.display(),
                options.max_len
            );
            stats.truncated += 1;
        }
        stats.examples += 1;
        stats.tokens += ex.len();
        stats.targets += ex.num_targets();
        stats.max_len = stats.max_len.max(ex.len());
        stats.by_shape[ex.shape as usize] += 1;
        examples.push(ex);
    }
    tracing::info!(
        path = %name.display(),
        examples = stats.examples,
        tokens = stats.tokens,
        targets = stats.targets,
        truncated = stats.truncated,
        dropped = stats.dropped,
        "loaded JSONL"
    );
    Ok(Dataset {
        path: name.to_path_buf(),
        examples,
        stats,
    })
}

/// Parses one non-blank line into an example (before length checks). Errors are the message
/// part of a `file:line: message` error.
fn parse_line(
    text: &str,
    line: usize,
    tokenizer: Option<&Tokenizer>,
    options: &JsonlOptions,
) -> std::result::Result<Example, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg
            .rsplit_once(" at line ")
            .map_or(msg.as_str(), |(m, _)| m);
        format!("not valid JSON: {msg} at column {}", e.column())
    })?;
    let Value::Object(obj) = value else {
        return Err(format!("expected a JSON object, found {}", kind(&value)));
    };
    if let Some(Value::Array(context)) = obj.get("context") {
        let prompt = ids_field("context", context)?;
        let completion = match obj.get("completion") {
            Some(Value::Array(c)) => ids_field("completion", c)?,
            Some(v) => {
                return Err(format!(
                    "field `completion` must be an array of token ids like `context`, found {}",
                    kind(v)
                ))
            }
            None => return Err("missing field `completion`".into()),
        };
        if prompt.is_empty() && completion.is_empty() {
            return Err("`context` and `completion` are both empty".into());
        }
        return Ok(build(line, Shape::PreTokenized, prompt, completion, false));
    }
    let (shape, prompt, completion) = if obj.contains_key("prompt") || obj.contains_key("context") {
        let key = if obj.contains_key("prompt") {
            "prompt"
        } else {
            "context"
        };
        let prompt = str_field(&obj, key)?.to_owned();
        (
            Shape::PromptCompletion,
            prompt,
            str_field(&obj, "completion")?,
        )
    } else if obj.contains_key("instruction") {
        let instruction = str_field(&obj, "instruction")?;
        let input = match obj.get("input") {
            None | Some(Value::Null) => "",
            Some(_) => str_field(&obj, "input")?,
        };
        let output = str_field(&obj, "output")?;
        (Shape::Alpaca, alpaca_prompt(instruction, input), output)
    } else if obj.contains_key("text") {
        (Shape::Text, String::new(), str_field(&obj, "text")?)
    } else if obj.contains_key("completion") {
        return Err("missing field `prompt`".into());
    } else if obj.contains_key("output") {
        return Err("missing field `instruction`".into());
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        return Err(format!(
            "no known fields (expected `prompt`+`completion`, `instruction`+`output`, `text`, \
             or `context`+`completion` id arrays), found {keys:?}"
        ));
    };
    let tok = tokenizer.ok_or("a text example needs a tokenizer (none was given)")?;
    let encode = |field: &str, s: &str, special: bool| -> std::result::Result<Vec<u32>, String> {
        let r = match options.special_text {
            SpecialTokenText::Special => tok.encode(s, special),
            SpecialTokenText::Literal => tok.encode_literal(s, special),
            SpecialTokenText::Reject => match tok.find_special_text(s) {
                Some(t) => {
                    return Err(format!(
                        "field `{field}` contains the special token text `{t}` (HF would \
                         encode it as a special id; choose SpecialTokenText::Literal or \
                         ::Special to accept it)"
                    ))
                }
                None => tok.encode(s, special),
            },
        };
        r.map_err(|e| e.to_string())
    };
    let eos = tok.eos_id();
    let example = if shape == Shape::Text {
        let mut body = encode("text", completion, true)?;
        let prefix_len = tok.special_prefix().len().min(body.len());
        let prefix: Vec<u32> = body.drain(..prefix_len).collect();
        body.push(eos);
        build(line, shape, prefix, body, true)
    } else {
        let (prompt_field, completion_field) = match shape {
            Shape::Alpaca => ("instruction` or `input", "output"),
            _ => ("prompt", "completion"),
        };
        let prompt = encode(prompt_field, &prompt, true)?;
        let mut completion = encode(completion_field, completion, false)?;
        completion.push(eos);
        build(line, shape, prompt, completion, false)
    };
    Ok(example)
}

/// `prompt ++ completion` with the mask on the completion. The group hashes the prompt (or,
/// with `hash_all`, every id).
fn build(
    line: usize,
    shape: Shape,
    prompt: Vec<u32>,
    completion: Vec<u32>,
    hash_all: bool,
) -> Example {
    let mut ids = prompt;
    let prompt_len = ids.len();
    ids.extend_from_slice(&completion);
    let mut loss_mask = vec![false; prompt_len];
    loss_mask.resize(ids.len(), true);
    let hashed = if hash_all {
        &ids[..]
    } else {
        &ids[..prompt_len]
    };
    let group = fnv1a(hashed);
    Example {
        ids,
        loss_mask,
        line,
        shape,
        group,
    }
}

/// The Alpaca prompt for `instruction` and `input` (the no-input template when it is empty).
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    let template = if input.is_empty() {
        ALPACA_PROMPT_NO_INPUT
    } else {
        ALPACA_PROMPT
    };
    let mut out = String::with_capacity(template.len() + instruction.len() + input.len());
    let mut rest = template;
    for (hole, value) in [("{instruction}", instruction), ("{input}", input)] {
        if let Some((before, after)) = rest.split_once(hole) {
            out.push_str(before);
            out.push_str(value);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(format!("field `{key}` must be a string, found {}", kind(v))),
        None => Err(format!("missing field `{key}`")),
    }
}

fn ids_field(key: &str, values: &[Value]) -> std::result::Result<Vec<u32>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| format!("`{key}`[{i}] is not a token id: {v}"))
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// FNV-1a over the ids' little-endian bytes: stable across runs and platforms.
fn fnv1a(ids: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in ids.iter().flat_map(|id| id.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, options: &JsonlOptions) -> Result<Dataset> {
        parse_jsonl(text.as_bytes(), Path::new("e2e/train.jsonl"), None, options)
    }

    #[test]
    fn pretokenized_lines_need_no_tokenizer() {
        let data = "{\"context\": [5, 6, 2], \"completion\": [7, 8, 2]}\n\n  \n{\"context\": [9], \"completion\": [2], \"extra\": 1}\n";
        let ds = parse(data, &JsonlOptions::default()).unwrap();
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.stats.lines, 4);
        assert_eq!(ds.stats.blank, 2);
        let ex = &ds.examples[0];
        assert_eq!(ex.ids, [5, 6, 2, 7, 8, 2]);
        assert_eq!(ex.loss_mask, [false, false, false, true, true, true]);
        assert_eq!(ex.labels(), [-100, -100, -100, 7, 8, 2]);
        assert_eq!(ex.num_targets(), 3);
        assert_eq!((ex.line, ds.examples[1].line), (1, 4));
        assert_eq!(ds.stats.by_shape, [0, 0, 0, 2]);
        assert_eq!(ds.stats.targets, 4);
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let cases = [
            (
                "{\"context\": [1], \"completion\": [2]}\n{\"context\": [1]}\n",
                2,
                "missing field `completion`",
            ),
            (
                "\n{\"prompt\": \"x\"\n",
                2,
                "not valid JSON: EOF while parsing an object at column",
            ),
            ("[1, 2]\n", 1, "expected a JSON object, found an array"),
            (
                "{\"context\": [1, -3], \"completion\": [2]}\n",
                1,
                "`context`[1] is not a token id: -3",
            ),
            ("{\"completion\": \"x\"}\n", 1, "missing field `prompt`"),
            (
                "{\"prompt\": 3, \"completion\": \"x\"}\n",
                1,
                "field `prompt` must be a string, found a number",
            ),
            ("{\"foo\": 1}\n", 1, "no known fields"),
            (
                "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
                1,
                "needs a tokenizer",
            ),
            (
                "{\"context\": [1], \"completion\": \"b\"}\n",
                1,
                "must be an array of token ids",
            ),
        ];
        for (data, line, want) in cases {
            let err = parse(data, &JsonlOptions::default()).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.starts_with(&format!("e2e/train.jsonl:{line}: ")) && msg.contains(want),
                "{msg:?} should be at line {line} and contain {want:?}"
            );
        }
        let bad_utf8 = b"{\"context\": [1], \"completion\": [2]}\n\xff\n";
        let err = parse_jsonl(
            &bad_utf8[..],
            Path::new("f.jsonl"),
            None,
            &JsonlOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("f.jsonl:2: not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn overflow_truncates_drops_or_refuses() {
        let data = "{\"context\": [1, 2, 3], \"completion\": [4, 5, 6]}\n{\"context\": [1, 2, 3, 4, 5], \"completion\": [6]}\n";
        let options = JsonlOptions {
            max_len: 4,
            ..JsonlOptions::default()
        };
        let ds = parse(data, &options).unwrap();
        assert_eq!(ds.examples.len(), 1);
        assert_eq!(ds.examples[0].ids, [1, 2, 3, 4]);
        assert_eq!(ds.examples[0].loss_mask, [false, false, false, true]);
        assert_eq!((ds.stats.truncated, ds.stats.dropped), (1, 1));
        let refuse = JsonlOptions {
            overflow: Overflow::Refuse,
            ..options
        };
        let err = parse(data, &refuse).unwrap_err().to_string();
        assert!(
            err.starts_with("e2e/train.jsonl:1: sequence has 6 tokens, more than the maximum of 4"),
            "{err}"
        );
    }

    #[test]
    fn vocab_bound_is_checked() {
        let options = JsonlOptions {
            vocab_size: Some(8192),
            ..JsonlOptions::default()
        };
        let err = parse("{\"context\": [50118], \"completion\": [2]}\n", &options).unwrap_err();
        assert!(
            err.to_string()
                .contains(":1: token id 50118 is outside the vocabulary of 8192"),
            "{err}"
        );
    }

    #[test]
    fn alpaca_prompt_fills_the_template() {
        let p = alpaca_prompt("Add {input}.", "2 and 3");
        assert!(
            p.contains("### Instruction:\nAdd {input}.\n\n### Input:\n2 and 3\n\n### Response:")
        );
        assert!(
            p.starts_with("Below is an instruction that describes a task, paired with an input")
        );
        let q = alpaca_prompt("Say hi.", "");
        assert!(q.ends_with("### Instruction:\nSay hi.\n\n### Response:"));
        assert!(!q.contains("### Input"));
    }

    #[test]
    fn groups_follow_the_prompt() {
        let data = "{\"context\": [1, 2], \"completion\": [3]}\n{\"context\": [1, 2], \"completion\": [4, 5]}\n{\"context\": [1, 3], \"completion\": [3]}\n";
        let ds = parse(data, &JsonlOptions::default()).unwrap();
        assert_eq!(ds.examples[0].group, ds.examples[1].group);
        assert_ne!(ds.examples[0].group, ds.examples[2].group);
    }
}
