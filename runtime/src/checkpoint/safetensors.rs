//! A validating safetensors reader (RUNTIME.md §4.1–4.3).
//!
//! [`SafeTensors::open`] memory-maps a file, checks every rule of §4.3 before any tensor is
//! handed out, and then serves [`TensorView`]s: name, dtype, shape and the tensor's bytes as a
//! slice of the map (zero-copy). [`TensorView::to_f32`] converts F32/F16/BF16 to f32. Every
//! error names the file and, where there is one, the tensor. The writer is in
//! [`writer`](super::writer).

use super::dtype::{decode_f32, Dtype};
pub use super::error::SafetensorsError;
use super::json::{first_duplicate, Json};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest header the reader accepts, as the reference implementation (100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Result of safetensors reading and writing.
pub type Result<T, E = SafetensorsError> = std::result::Result<T, E>;

/// Bytes that `shape` elements of `dtype` occupy, or why they can't (overflow, sub-byte types
/// not filling whole bytes). Shared with the writer.
pub(crate) fn byte_size(dtype: Dtype, shape: &[usize]) -> std::result::Result<u64, String> {
    let numel = shape
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| format!("shape {shape:?} overflows the element count"))?;
    let bits = numel
        .checked_mul(dtype.bits() as u64)
        .ok_or_else(|| format!("shape {shape:?} of {dtype} overflows the byte count"))?;
    if !bits.is_multiple_of(8) {
        return Err(format!(
            "{numel} elements of {dtype} ({bits} bits) are not a whole number of bytes"
        ));
    }
    Ok(bits / 8)
}

/// The bytes behind a [`SafeTensors`]: a read-only memory map, or a buffer.
enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// One validated header entry; `begin..end` is relative to the data section.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

/// A validated safetensors file: its metadata and tensors, served without copying.
pub struct SafeTensors {
    file: PathBuf,
    storage: Storage,
    data_start: usize,
    metadata: BTreeMap<String, String>,
    /// Sorted by offset.
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for SafeTensors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeTensors")
            .field("file", &self.file)
            .field("tensors", &self.entries.len())
            .field("bytes", &self.storage.len())
            .finish()
    }
}

/// One tensor of a [`SafeTensors`]: its name, dtype, shape and little-endian C-order bytes,
/// borrowed from the file (the bytes may be unaligned).
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    file: &'a Path,
    name: &'a str,
    dtype: Dtype,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The file the tensor is in (for error messages).
    pub fn file(&self) -> &'a Path {
        self.file
    }
    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        self.name
    }
    /// Its dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Its shape (`[]` for a scalar).
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }
    /// Its raw bytes (little-endian, C order), a slice of the file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// The values as f32 (F32 copied, F16/BF16 widened exactly); other dtypes are an
    /// [`UnsupportedDtype`](SafetensorsError::UnsupportedDtype) error.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        decode_f32(self.dtype, self.bytes).ok_or_else(|| SafetensorsError::UnsupportedDtype {
            file: self.file.to_path_buf(),
            tensor: self.name.to_owned(),
            dtype: self.dtype,
        })
    }
}

impl SafeTensors {
    /// Opens and validates `path` through a read-only memory map. The file must not be
    /// modified while the returned value lives (checkpoints are treated as immutable).
    pub fn open(path: impl AsRef<Path>) -> Result<SafeTensors> {
        let file = path.as_ref().to_path_buf();
        let io = |op, source| SafetensorsError::Io {
            file: file.clone(),
            op,
            source,
        };
        let f = File::open(&file).map_err(|e| io("open", e))?;
        let len = f.metadata().map_err(|e| io("stat", e))?.len();
        if len < 8 {
            return Err(SafetensorsError::TooShort { file, len });
        }
        // SAFETY: the map is read-only and private to this value; the file is a checkpoint that
        // nothing is expected to modify while it is open (see the doc comment). Every access goes
        // through bounds validated against the map's length.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io("memory-map", e))?;
        Self::from_storage(file, Storage::Mmap(map))
    }

    /// Reads `path` into memory and validates it (no memory map).
    pub fn read(path: impl AsRef<Path>) -> Result<SafeTensors> {
        let file = path.as_ref().to_path_buf();
        let mut bytes = Vec::new();
        File::open(&file)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| SafetensorsError::Io {
                file: file.clone(),
                op: "read",
                source,
            })?;
        Self::from_storage(file, Storage::Owned(bytes))
    }

    /// Validates an in-memory file; `file` is only used to name it in errors.
    pub fn from_bytes(file: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<SafeTensors> {
        Self::from_storage(file.into(), Storage::Owned(bytes))
    }

    fn from_storage(file: PathBuf, storage: Storage) -> Result<SafeTensors> {
        let (data_start, metadata, entries) = parse(&file, &storage)?;
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        tracing::debug!(file = %file.display(), tensors = entries.len(), "safetensors file validated");
        Ok(SafeTensors {
            file,
            storage,
            data_start,
            metadata,
            entries,
            by_name,
        })
    }

    /// The file's path.
    pub fn file(&self) -> &Path {
        &self.file
    }
    /// The header's `__metadata__` (empty if absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    /// Tensor names, in the order of their data.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }
    /// Every tensor, in the order of its data.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'_>> {
        self.entries.iter().map(|e| self.view(e))
    }
    /// Whether the file has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
    /// The tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.by_name.get(name).map(|&i| self.view(&self.entries[i]))
    }
    /// The tensor `name`, or a [`MissingTensor`](SafetensorsError::MissingTensor) error.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        self.tensor(name)
            .ok_or_else(|| SafetensorsError::MissingTensor {
                file: self.file.clone(),
                tensor: name.to_owned(),
            })
    }

    fn view<'a>(&'a self, e: &'a Entry) -> TensorView<'a> {
        TensorView {
            file: &self.file,
            name: &e.name,
            dtype: e.dtype,
            shape: &e.shape,
            // In bounds: `parse` checked `data_start + end <= len`.
            bytes: &self.storage[self.data_start + e.begin..self.data_start + e.end],
        }
    }
}

/// Checks RUNTIME.md §4.3 rules 1–7 on `bytes`; returns the data section's start, the metadata
/// and the entries sorted by offset.
fn parse(file: &Path, bytes: &[u8]) -> Result<(usize, BTreeMap<String, String>, Vec<Entry>)> {
    let file_len = bytes.len() as u64;
    let header_len = match bytes.get(..8) {
        Some(b) => u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        None => {
            return Err(SafetensorsError::TooShort {
                file: file.into(),
                len: file_len,
            })
        }
    };
    if header_len > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge {
            file: file.into(),
            header_len,
        });
    }
    // header_len <= 1e8, so this cannot overflow.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(SafetensorsError::HeaderPastEnd {
            file: file.into(),
            header_len,
            file_len,
        });
    }
    let data_start = data_start as usize;
    let header_err = |reason: String| SafetensorsError::Header {
        file: file.into(),
        reason,
    };
    let header = std::str::from_utf8(&bytes[8..data_start])
        .map_err(|e| header_err(format!("not valid UTF-8 ({e})")))?;
    if !header.starts_with('{') {
        return Err(header_err("the header must start with `{`".into()));
    }
    let top = match Json::parse(header) {
        Ok(Json::Object(entries)) => entries,
        Ok(other) => {
            return Err(header_err(format!(
                "expected an object, found {}",
                other.kind()
            )))
        }
        Err(e) => return Err(header_err(format!("not valid JSON: {e}"))),
    };
    if let Some(dup) = first_duplicate(&top) {
        return Err(SafetensorsError::Entry {
            file: file.into(),
            tensor: dup.to_owned(),
            reason: "the name appears more than once in the header".into(),
        });
    }

    let data_len = file_len - data_start as u64;
    let mut metadata = BTreeMap::new();
    let mut entries = Vec::with_capacity(top.len());
    for (name, value) in top {
        if name == "__metadata__" {
            metadata = parse_metadata(value).map_err(header_err)?;
        } else {
            entries.push(parse_entry(file, name, value)?);
        }
    }

    // Rules 4 and 6: sorted by offset, the tensors tile the data section exactly.
    entries.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut expected = 0u64;
    let mut previous: Option<&str> = None;
    for (e, begin, end) in entries.iter().map(|e| (e, e.begin as u64, e.end as u64)) {
        if begin != expected {
            return Err(SafetensorsError::NotContiguous {
                file: file.into(),
                tensor: e.name.clone(),
                begin,
                end,
                previous: previous.map(str::to_owned),
                expected,
            });
        }
        if end > data_len {
            return Err(SafetensorsError::OutOfBounds {
                file: file.into(),
                tensor: e.name.clone(),
                begin,
                end,
                data_len,
            });
        }
        expected = end;
        previous = Some(&e.name);
    }
    if expected != data_len {
        return Err(SafetensorsError::TrailingBytes {
            file: file.into(),
            last: previous.map(str::to_owned),
            covered: expected,
            data_len,
        });
    }
    Ok((data_start, metadata, entries))
}

/// `__metadata__`: an object whose values are strings.
fn parse_metadata(value: Json) -> std::result::Result<BTreeMap<String, String>, String> {
    let Json::Object(items) = value else {
        return Err(format!(
            "`__metadata__` must be an object, found {}",
            value.kind()
        ));
    };
    if let Some(dup) = first_duplicate(&items) {
        return Err(format!("`__metadata__` has key `{dup}` more than once"));
    }
    items
        .into_iter()
        .map(|(k, v)| match v {
            Json::String(s) => Ok((k, s)),
            other => Err(format!(
                "`__metadata__` values must be strings; `{k}` is {}",
                other.kind()
            )),
        })
        .collect()
}

/// One tensor entry (rules 3 and 5).
fn parse_entry(file: &Path, name: String, value: Json) -> Result<Entry> {
    let bad = |name: &str, reason: String| SafetensorsError::Entry {
        file: file.into(),
        tensor: name.to_owned(),
        reason,
    };
    let Json::Object(fields) = value else {
        return Err(bad(
            &name,
            format!("entry must be an object, found {}", value.kind()),
        ));
    };
    if let Some(dup) = first_duplicate(&fields) {
        return Err(bad(&name, format!("key `{dup}` appears more than once")));
    }
    let (mut dtype, mut shape, mut offsets) = (None, None, None);
    for (key, v) in fields {
        match key.as_str() {
            "dtype" => dtype = Some(v),
            "shape" => shape = Some(v),
            "data_offsets" => offsets = Some(v),
            _ => {
                return Err(bad(
                    &name,
                    format!(
                    "unexpected key `{key}` (entries have exactly dtype, shape and data_offsets)"
                ),
                ))
            }
        }
    }
    let dtype = match dtype {
        Some(Json::String(s)) => match Dtype::from_name(&s) {
            Some(d) => d,
            None => {
                return Err(SafetensorsError::UnknownDtype {
                    file: file.into(),
                    tensor: name,
                    dtype: s,
                })
            }
        },
        Some(other) => {
            return Err(bad(
                &name,
                format!("dtype must be a string, found {}", other.kind()),
            ))
        }
        None => return Err(bad(&name, "missing `dtype`".into())),
    };
    let shape = uints(shape)
        .and_then(|s| {
            s.into_iter()
                .map(|d| usize::try_from(d).ok())
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            bad(
                &name,
                "`shape` must be an array of non-negative integers".into(),
            )
        })?;
    let (begin, end) = match uints(offsets).as_deref() {
        Some(&[b, e]) => (b, e),
        _ => {
            return Err(bad(
                &name,
                "`data_offsets` must be an array of two non-negative integers".into(),
            ))
        }
    };
    if begin > end {
        return Err(bad(
            &name,
            format!("data_offsets [{begin}, {end}] end before they begin"),
        ));
    }
    let expected = byte_size(dtype, &shape).map_err(|r| bad(&name, r))?;
    if expected != end - begin {
        return Err(SafetensorsError::SizeMismatch {
            file: file.into(),
            tensor: name,
            dtype,
            shape,
            expected,
            begin,
            end,
        });
    }
    // Offsets larger than usize can't be within the mapped data; OutOfBounds catches those
    // after sorting, so saturate here.
    let begin = usize::try_from(begin).unwrap_or(usize::MAX);
    let end = usize::try_from(end).unwrap_or(usize::MAX);
    Ok(Entry {
        name,
        dtype,
        shape,
        begin,
        end,
    })
}

/// The values of a JSON array of non-negative integers.
fn uints(v: Option<Json>) -> Option<Vec<u64>> {
    match v? {
        Json::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Json::UInt(u) => Some(u),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}
