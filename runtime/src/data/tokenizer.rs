//! Hugging Face `tokenizer.json` through the `tokenizers` crate (RUNTIME §5.1).
//!
//! Encoding goes through the same crate HF's Python tokenizers wrap, so ids match HF exactly,
//! including the post-processor: for OPT (and the fixture tokenizer) `encode(text, true)` is
//! `[2] ++ encode(text, false)`, `</s>` serving as the BOS.

use std::path::{Path, PathBuf};

use super::{DataError, Result};

/// A loaded `tokenizer.json`, with the facts the data pipeline needs about it: the ids the
/// post-processor adds around a single sequence, the EOS id, and the texts of special tokens
/// (which HF matches inside raw text, see [`Tokenizer::find_special_text`]).
#[derive(Clone)]
pub struct Tokenizer {
    /// HF behaviour: special-token texts inside the input become their special ids.
    inner: tokenizers::Tokenizer,
    /// Same tokenizer with `encode_special_tokens` on: special-token texts are plain text.
    literal: tokenizers::Tokenizer,
    path: PathBuf,
    special_prefix: Vec<u32>,
    special_suffix: Vec<u32>,
    eos_id: u32,
    special_texts: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("special_prefix", &self.special_prefix)
            .field("special_suffix", &self.special_suffix)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Tokenizer {
    /// The longest added token [`from_bytes`](Self::from_bytes) accepts, in bytes. The
    /// `tokenizers` crate matches added tokens with an Aho-Corasick automaton whose construction
    /// takes time quadratic in a token's length for repetitive tokens (a 70 kB `"aaa…"` token
    /// takes minutes); real special tokens are a few dozen bytes.
    pub const MAX_ADDED_TOKEN_BYTES: usize = 256;

    /// The most bytes all added tokens together may have (Gemma-size lists of reserved tokens
    /// take about 100 kB), for the same reason.
    pub const MAX_ADDED_TOKENS_BYTES: usize = 1 << 20;

    /// Loads `path` (a `tokenizer.json`) with `</s>` as the EOS token, OPT's convention (also
    /// the fixture models'). Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file_with_eos(path, "</s>")
    }

    /// Loads `path` with `eos_token` (a token's text, e.g. `"<|endoftext|>"` for GPT-2) as the
    /// EOS appended after every completion.
    pub fn from_file_with_eos(path: impl AsRef<Path>, eos_token: &str) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let load_err = |message: String| DataError::TokenizerLoad {
            path: path.clone(),
            message,
        };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let bytes = std::fs::read(&path).map_err(|e| load_err(e.to_string()))?;
        Self::from_bytes(path, &bytes, eos_token)
    }

    /// Loads a `tokenizer.json` held in memory, with `eos_token` as the EOS; `name` is the
    /// path used in messages. Same checks as [`from_file_with_eos`](Self::from_file_with_eos),
    /// without touching the file system (for tests and fuzzing of the loader).
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: &[u8], eos_token: &str) -> Result<Self> {
        let path = name.into();
        let load_err = |message: String| DataError::TokenizerLoad {
            path: path.clone(),
            message,
        };
        check_added_tokens(bytes).map_err(load_err)?;
        let inner = guarded(|| tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| e.to_string()))
            .map_err(load_err)?;
        Self::from_inner(path, inner, eos_token)
    }

    /// The checks and probes shared by the loaders, on a parsed tokenizer.
    fn from_inner(path: PathBuf, inner: tokenizers::Tokenizer, eos_token: &str) -> Result<Self> {
        let load_err = |message: String| DataError::TokenizerLoad {
            path: path.clone(),
            message,
        };
        let eos_id = inner
            .token_to_id(eos_token)
            .ok_or_else(|| load_err(format!("no EOS token `{eos_token}` in the vocabulary")))?;
        let mut literal = inner.clone();
        literal.set_encode_special_tokens(true);
        let mut special_texts: Vec<String> = inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        // Longest first, so that `find_special_text` reports `</s>` rather than a shorter one.
        special_texts.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        let mut tok = Tokenizer {
            inner,
            literal,
            path,
            special_prefix: Vec::new(),
            special_suffix: Vec::new(),
            eos_id,
            special_texts,
        };
        tok.probe_post_processor()?;
        tracing::debug!(
            path = %tok.path.display(),
            vocab = tok.vocab_size(),
            prefix = ?tok.special_prefix,
            suffix = ?tok.special_suffix,
            eos = tok.eos_id,
            "loaded tokenizer"
        );
        Ok(tok)
    }

    /// Finds what the post-processor adds to a single sequence by encoding a probe text with
    /// and without special tokens.
    fn probe_post_processor(&mut self) -> Result<()> {
        let probe = "a";
        let with = self.encode(probe, true)?;
        let without = self.encode(probe, false)?;
        let at = (0..=with.len().saturating_sub(without.len()))
            .find(|&i| with.get(i..i + without.len()) == Some(without.as_slice()));
        match at {
            Some(i) if !without.is_empty() => {
                self.special_prefix = with[..i].to_vec();
                self.special_suffix = with[i + without.len()..].to_vec();
            }
            _ => tracing::warn!(
                path = %self.path.display(),
                "cannot tell what the post-processor adds (probe {with:?} vs {without:?})"
            ),
        }
        if !self.special_suffix.is_empty() {
            tracing::warn!(
                path = %self.path.display(),
                suffix = ?self.special_suffix,
                "the post-processor appends special tokens to a single sequence: prompts \
                 encoded with special tokens will carry them before the completion"
            );
        }
        Ok(())
    }

    /// The file this tokenizer was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added tokens (8192 for the fixture tokenizer). Models may
    /// have more embedding rows than this (OPT pads 50265 to 50272).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids the post-processor puts before a single sequence (`[2]` for OPT: `</s>` as BOS).
    pub fn special_prefix(&self) -> &[u32] {
        &self.special_prefix
    }

    /// Ids the post-processor puts after a single sequence (none for OPT).
    pub fn special_suffix(&self) -> &[u32] {
        &self.special_suffix
    }

    /// The EOS id appended after completions (2 for OPT).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Encodes `text` exactly as HF's `tokenizer(text, add_special_tokens=...)`: special-token
    /// texts inside `text` (a literal `</s>`) become their special ids.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.inner, text, add_special_tokens)
    }

    /// Like [`encode`](Self::encode) but special-token texts inside `text` are tokenized as
    /// ordinary text (`</s>` becomes `<`, `/`, `s`, `>` pieces), so user text can never
    /// inject an EOS. The post-processor's own special ids are still added.
    pub fn encode_literal(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.literal, text, add_special_tokens)
    }

    fn encode_with(
        &self,
        tok: &tokenizers::Tokenizer,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>> {
        guarded(|| {
            tok.encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string())
        })
        .map_err(|message| DataError::Tokenize {
            path: self.path.clone(),
            message,
        })
    }

    /// The first special-token text (e.g. `</s>`) that occurs inside `text`, if any: HF would
    /// turn it into a special id, which is rarely what a dataset means.
    pub fn find_special_text(&self, text: &str) -> Option<&str> {
        self.special_texts
            .iter()
            .find(|s| text.contains(s.as_str()))
            .map(String::as_str)
    }

    /// Decodes ids back to text (byte-level decoder), for debugging and generation output.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        guarded(|| {
            self.inner
                .decode(ids, skip_special_tokens)
                .map_err(|e| e.to_string())
        })
        .map_err(|message| DataError::Tokenize {
            path: self.path.clone(),
            message,
        })
    }

    /// The id of a token's text (`"</s>"` → 2, `"Ġworld"` → its id), if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id (byte-level symbols, e.g. `Ġ` for a leading space).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Checks the `added_tokens` of a `tokenizer.json` against
/// [`Tokenizer::MAX_ADDED_TOKEN_BYTES`] and [`Tokenizer::MAX_ADDED_TOKENS_BYTES`] before the
/// `tokenizers` crate builds its matcher. Malformed JSON passes here: the crate reports it.
fn check_added_tokens(bytes: &[u8]) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Added {
        content: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    let Ok(file) = serde_json::from_slice::<File>(bytes) else {
        return Ok(());
    };
    let mut total = 0usize;
    for (i, t) in file.added_tokens.iter().enumerate() {
        if t.content.len() > Tokenizer::MAX_ADDED_TOKEN_BYTES {
            return Err(format!(
                "added_tokens[{i}] is {} bytes long, more than the limit of \
                 {} (starts with {:?})",
                t.content.len(),
                Tokenizer::MAX_ADDED_TOKEN_BYTES,
                t.content.chars().take(16).collect::<String>()
            ));
        }
        total += t.content.len();
    }
    if total > Tokenizer::MAX_ADDED_TOKENS_BYTES {
        return Err(format!(
            "the {} added_tokens hold {total} bytes, more than the limit of \
             {}",
            file.added_tokens.len(),
            Tokenizer::MAX_ADDED_TOKENS_BYTES
        ));
    }
    Ok(())
}

/// Runs a call into the `tokenizers` crate with its panics turned into errors: the crate
/// `expect`s on some malformed files (a `decoder` object that is neither tagged nor legacy
/// panics with `Helper: ...` while parsing), and a user's `tokenizer.json` must give an error
/// naming the file, not a crash. The panic message is still printed by the panic hook.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        Err(format!(
            "the tokenizers crate failed on this input ({what})"
        ))
    })
}
