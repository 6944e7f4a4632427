//! A deterministic, structure-aware mutator: every input is a function of a seed alone
//! (`SplitMix64`), so a failing input is reproduced from the seed printed with it.
//!
//! An input is a list of parts (the files of one target), each of a [`Kind`]. On top of the
//! generic byte mutations (bit flips, inserts, deletes, duplicates, splices, interesting
//! integers, truncation) text parts get JSON-aware ones (numbers replaced by huge or negative
//! values, strings by tricky ones, whole values by other kinds, deep nesting) and safetensors
//! parts header-aware ones (the header mutated as JSON with its length fixed up, or the length
//! field set to huge or off-by-one values).

use lexp_runtime::checkpoint::MAX_HEADER_LEN;
use lexp_runtime::data::SplitMix64;

/// What a part holds, which picks the mutations that make sense for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A safetensors file.
    Safetensors,
    /// One JSON document.
    Json,
    /// JSON lines.
    Lines,
    /// One byte of option flags.
    Flags,
}

/// Parts never grow past this (a mutated copy of the 7 MB fixture may double once).
const MAX_PART: usize = 16 << 20;

/// Numbers that sit on the edges of the parsers' integer types and limits.
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "8",
    "255",
    "65536",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "100000000",
    "100000001",
    "1000000000000",
    "1e308",
    "1e999",
    "-1e999",
    "1.5",
    "-0",
    "0.0",
    "1E2",
    "123456789012345678901234567890",
];

/// String contents: special-token texts, dtype and key names, path tricks, escapes.
const STRINGS: &[&str] = &[
    "",
    "</s>",
    "<pad>",
    "\\u0000",
    "\\ud800",
    "\\uDFFF\\uD800",
    "F4",
    "F6_E2M3",
    "BOOL",
    "F16",
    "BF16",
    "F32",
    "I64",
    "C64",
    "F8_E4M3",
    "__metadata__",
    "LORA",
    "all-linear",
    "q_proj",
    "fc1",
    "model.decoder.layers.0.fc1",
    "base_model.model.model.decoder.layers.1.self_attn.v_proj.lora_B.weight",
    "model.decoder.embed_tokens.weight",
    "..",
    "../x",
    "/etc/passwd",
    "a/b",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "relu",
    "gelu_new",
    "opt",
    "\\n",
    "é漢😀",
];

/// Whole JSON values to put where another value was.
const VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "[0]",
    "[0,0]",
    "[18446744073709551615]",
    "[4294967296,4294967296,4294967296]",
    "[0,18446744073709551615]",
    "[18446744073709551615,0]",
    "[1,2,3]",
    r#"{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}"#,
    r#"{"dtype":"U8","shape":[0,18446744073709551615,2],"data_offsets":[0,0]}"#,
    r#"{"format":"pt"}"#,
    r#"{"prompt":"a","completion":"b"}"#,
    "\"x\"",
    "-1",
    "1e999",
];

/// Bytes worth writing over a random one.
const BYTES: &[u8] = b"\x00\xff\x7f\x80{}[]\",:\\\n 09-.e";

/// Makes inputs for one target from its seed corpus (each entry one list of parts).
pub struct Mutator<'a> {
    corpus: &'a [Vec<Vec<u8>>],
    kinds: &'a [Kind],
}

impl<'a> Mutator<'a> {
    /// A mutator over `corpus`, whose entries have one part per entry of `kinds`.
    pub fn new(corpus: &'a [Vec<Vec<u8>>], kinds: &'a [Kind]) -> Self {
        assert!(!corpus.is_empty(), "empty corpus");
        assert!(corpus.iter().all(|c| c.len() == kinds.len()));
        Mutator { corpus, kinds }
    }

    /// The input of `seed`: a corpus entry with 1 to 4 stacked mutations (1 or 2 most often).
    pub fn input(&self, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = SplitMix64::new(seed);
        let mut parts = self.corpus[pick(&mut rng, self.corpus.len())].clone();
        let n = [1, 1, 1, 2, 2, 3, 4][pick(&mut rng, 7)];
        for _ in 0..n {
            let i = pick(&mut rng, parts.len());
            self.mutate(&mut rng, i, &mut parts[i]);
            parts[i].truncate(MAX_PART);
        }
        parts
    }

    fn mutate(&self, rng: &mut SplitMix64, part: usize, b: &mut Vec<u8>) {
        match self.kinds[part] {
            Kind::Flags => *b = vec![rng.next_u64() as u8],
            Kind::Safetensors => match pick(rng, 10) {
                0..=3 => header(rng, b),
                4 => length_field(rng, b),
                5 => resize_data(rng, b),
                6 => self.splice(rng, part, b),
                _ => bytes(rng, b),
            },
            Kind::Json | Kind::Lines => match pick(rng, 12) {
                0..=5 => text(rng, b),
                6 if self.kinds[part] == Kind::Lines => lines(rng, b),
                7 => self.splice(rng, part, b),
                _ => bytes(rng, b),
            },
        }
    }

    /// Inserts or writes over a range taken from the same part of another corpus entry.
    fn splice(&self, rng: &mut SplitMix64, part: usize, b: &mut Vec<u8>) {
        let other = &self.corpus[pick(rng, self.corpus.len())][part];
        if other.is_empty() {
            return bytes(rng, b);
        }
        let (s, e) = range(rng, other.len());
        let at = pick(rng, b.len() + 1);
        if rng.next_u64() & 1 == 0 {
            b.splice(at..at, other[s..e].iter().copied());
        } else {
            let end = (at + e - s).min(b.len());
            b.splice(at..end, other[s..e].iter().copied());
        }
    }
}

/// Uniform in `0..n` (`n > 0`).
fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    rng.below(n.max(1) as u64) as usize
}

/// A random non-empty range of `0..len` (`len > 0`), short ones most likely.
fn range(rng: &mut SplitMix64, len: usize) -> (usize, usize) {
    let s = pick(rng, len);
    let max = (len - s).min([4, 16, 256, len][pick(rng, 4)]).max(1);
    (s, s + 1 + pick(rng, max).min(len - s - 1))
}

/// Generic byte-level mutations.
fn bytes(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let len = b.len();
    match pick(rng, 9) {
        0 if len > 0 => {
            let i = pick(rng, len);
            b[i] ^= 1 << pick(rng, 8);
        }
        1 if len > 0 => {
            let i = pick(rng, len);
            b[i] = BYTES[pick(rng, BYTES.len())];
        }
        2 => {
            let at = pick(rng, len + 1);
            let n = 1 + pick(rng, 8);
            let new: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, new);
        }
        3 if len > 0 => {
            let (s, e) = range(rng, len);
            b.drain(s..e);
        }
        4 if len > 0 => {
            let (s, e) = range(rng, len);
            let copy = b[s..e].to_vec();
            let at = pick(rng, len + 1);
            b.splice(at..at, copy);
        }
        5 => {
            let v = interesting_u64(rng, len as u64);
            let at = pick(rng, len + 1);
            let le = v.to_le_bytes();
            let w = if rng.next_u64() & 1 == 0 { 8 } else { 4 };
            let end = (at + w).min(len);
            b.splice(at..end, le[..w].iter().copied());
        }
        6 => b.truncate(pick(rng, len + 1)),
        _ => {
            if len > 0 {
                let i = pick(rng, len);
                b[i] = rng.next_u64() as u8;
            } else {
                b.push(rng.next_u64() as u8);
            }
        }
    }
}

/// Edge values for binary integers, some relative to the input's length.
fn interesting_u64(rng: &mut SplitMix64, len: u64) -> u64 {
    let values = [
        0,
        1,
        7,
        8,
        (1 << 31) - 1,
        1 << 31,
        (1 << 32) - 1,
        1 << 32,
        1 << 63,
        u64::MAX,
        u64::MAX - 7,
        MAX_HEADER_LEN,
        MAX_HEADER_LEN + 1,
        len,
        len.wrapping_sub(8),
        len.wrapping_sub(7),
        len.wrapping_sub(9),
    ];
    values[pick(rng, values.len())]
}

/// JSON-aware text mutations (they work on any bytes; on JSON they keep it mostly valid).
fn text(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    match pick(rng, 6) {
        0 | 1 => replace_number(rng, b),
        2 => replace_string(rng, b),
        3 | 4 => replace_value(rng, b),
        _ => {
            let depth = [64, 129, 200, 5000][pick(rng, 4)];
            let (open, close) = if rng.next_u64() & 1 == 0 {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let mut ins = open.repeat(depth);
            if rng.next_u64() & 1 == 0 {
                ins.push_str(&close.repeat(depth));
            }
            let at = pick(rng, b.len() + 1);
            b.splice(at..at, ins.into_bytes());
        }
    }
}

/// Replaces the number around a random digit with an edge value.
fn replace_number(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let digits: Vec<usize> = positions(b, |c| c.is_ascii_digit());
    let Some(&at) = sample(rng, &digits) else {
        return bytes(rng, b);
    };
    let part = |c: u8| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-');
    let mut s = at;
    while s > 0 && part(b[s - 1]) {
        s -= 1;
    }
    let mut e = at;
    while e < b.len() && part(b[e]) {
        e += 1;
    }
    let n = NUMBERS[pick(rng, NUMBERS.len())];
    b.splice(s..e, n.bytes());
}

/// Replaces the contents of a random string (from a quote to the next one).
fn replace_string(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let quotes = positions(b, |c| c == b'"');
    let Some(&q) = sample(rng, &quotes) else {
        return bytes(rng, b);
    };
    let end = b[q + 1..]
        .iter()
        .position(|&c| c == b'"')
        .map_or(b.len(), |p| q + 1 + p);
    let new = if pick(rng, 8) == 0 {
        "a".repeat([300, 70_000][pick(rng, 2)])
    } else {
        STRINGS[pick(rng, STRINGS.len())].to_owned()
    };
    b.splice(q + 1..end, new.into_bytes());
}

/// Replaces the value after a random `:`, `,` or `[` with another value.
fn replace_value(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let seps = positions(b, |c| matches!(c, b':' | b',' | b'['));
    let Some(&sep) = sample(rng, &seps) else {
        return bytes(rng, b);
    };
    let mut s = sep + 1;
    while s < b.len() && b[s].is_ascii_whitespace() {
        s += 1;
    }
    let e = value_end(b, s);
    let v = VALUES[pick(rng, VALUES.len())];
    b.splice(s..e, v.bytes());
}

/// End of the JSON value starting at `s` (a string, a bracketed value or a scalar), found
/// by a simple scan that tolerates malformed text.
fn value_end(b: &[u8], s: usize) -> usize {
    match b.get(s) {
        None => s,
        Some(b'"') => b[s + 1..]
            .iter()
            .position(|&c| c == b'"')
            .map_or(b.len(), |p| s + p + 2),
        Some(b'[' | b'{') => {
            let mut depth = 0usize;
            let mut in_str = false;
            for (i, &c) in b.iter().enumerate().skip(s) {
                match (in_str, c) {
                    (true, b'"') => in_str = false,
                    (false, b'"') => in_str = true,
                    (false, b'[' | b'{') => depth += 1,
                    (false, b']' | b'}') => {
                        depth -= 1;
                        if depth == 0 {
                            return i + 1;
                        }
                    }
                    _ => {}
                }
            }
            b.len()
        }
        Some(_) => b[s..]
            .iter()
            .position(|&c| matches!(c, b',' | b'}' | b']') || c.is_ascii_whitespace())
            .map_or(b.len(), |p| s + p),
    }
}

/// Line-level mutations of JSONL: duplicate, delete, swap, blank or huge lines.
fn lines(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let mut ls: Vec<Vec<u8>> = b.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
    let n = ls.len();
    match pick(rng, 5) {
        0 => {
            let i = pick(rng, n);
            let l = ls[i].clone();
            ls.insert(pick(rng, n + 1), l);
        }
        1 if n > 1 => {
            ls.remove(pick(rng, n));
        }
        2 => {
            let (i, j) = (pick(rng, n), pick(rng, n));
            ls.swap(i, j);
        }
        3 => ls.insert(pick(rng, n + 1), b"  \r".to_vec()),
        _ => {
            let ids = vec!["7"; [10, 3000, 100_000][pick(rng, 3)]].join(",");
            let line = format!("{{\"context\": [{ids}], \"completion\": [2]}}");
            ls.insert(pick(rng, n + 1), line.into_bytes());
        }
    }
    *b = ls.join(&b'\n');
}

/// Mutates the header of a safetensors file as JSON text, then (most of the time) writes its
/// new length into the length field so that the mutation reaches the JSON checks.
fn header(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let Some(len) = b
        .get(..8)
        .map(|l| u64::from_le_bytes(l.try_into().unwrap_or([0; 8])))
    else {
        return bytes(rng, b);
    };
    let end = 8usize.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
    if end > b.len() {
        return bytes(rng, b);
    }
    let mut h = b[8..end].to_vec();
    text(rng, &mut h);
    let new_len = if pick(rng, 5) == 0 {
        len
    } else {
        h.len() as u64
    };
    let mut out = new_len.to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&b[end..]);
    *b = out;
}

/// Writes an edge value into the 8-byte header length.
fn length_field(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    if b.len() < 8 {
        b.resize(8, 0);
    }
    let v = interesting_u64(rng, b.len() as u64);
    b[..8].copy_from_slice(&v.to_le_bytes());
}

/// Cuts or extends the end of the file (the data section).
fn resize_data(rng: &mut SplitMix64, b: &mut Vec<u8>) {
    let delta = [1, 2, 4, 8, 100][pick(rng, 5)];
    if rng.next_u64() & 1 == 0 {
        b.truncate(b.len().saturating_sub(delta));
    } else {
        b.resize(b.len() + delta, 0);
    }
}

fn positions(b: &[u8], f: impl Fn(u8) -> bool) -> Vec<usize> {
    // Sampling positions of a 7 MB file would be slow: only its first 64 KiB (the header
    // and the start of the data) are searched.
    b.iter()
        .take(64 << 10)
        .enumerate()
        .filter(|(_, &c)| f(c))
        .map(|(i, _)| i)
        .collect()
}

fn sample<'v, T>(rng: &mut SplitMix64, v: &'v [T]) -> Option<&'v T> {
    (!v.is_empty()).then(|| &v[pick(rng, v.len())])
}
