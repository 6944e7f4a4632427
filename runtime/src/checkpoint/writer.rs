//! The safetensors writer (RUNTIME.md §4.4) and atomic file replacement.
//!
//! [`write()`] produces what the reference writer (Python `safetensors`) produces for the same
//! tensors, byte for byte: data ordered by dtype descending (larger elements first, so every
//! tensor is naturally aligned) then by name, a compact header with
//! `"__metadata__": {"format": "pt"}` first, padded with spaces so the data starts at a multiple
//! of 8. It replaces the target atomically: a
//! temporary file in the same directory is written, fsynced and renamed over the target, so a
//! crash leaves either the old file or the new one, never a torn adapter.

use super::dtype::{encode_f32, Dtype};
use super::safetensors::{byte_size, Result, SafetensorsError, TensorView};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A tensor to write: name, dtype, shape and little-endian C-order bytes (borrowed or owned).
#[derive(Debug, Clone)]
pub struct WriteTensor<'a> {
    /// The tensor's name (must be unique in the file and not `__metadata__`).
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its bytes; their length must be what dtype and shape need.
    pub bytes: Cow<'a, [u8]>,
}

impl WriteTensor<'static> {
    /// A tensor from f32 values, stored as `dtype` (F32, F16 or BF16; round to nearest even).
    /// `None` if `dtype` is not one of those; the length is checked by [`write()`].
    pub fn from_f32(
        name: impl Into<String>,
        shape: Vec<usize>,
        values: &[f32],
        dtype: Dtype,
    ) -> Option<WriteTensor<'static>> {
        Some(WriteTensor {
            name: name.into(),
            dtype,
            shape,
            bytes: Cow::Owned(encode_f32(values, dtype)?),
        })
    }
}

impl<'a> From<TensorView<'a>> for WriteTensor<'a> {
    /// Copies a tensor from a file being read, borrowing its bytes.
    fn from(v: TensorView<'a>) -> Self {
        WriteTensor {
            name: v.name().to_owned(),
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            bytes: Cow::Borrowed(v.bytes()),
        }
    }
}

/// Writes `tensors` to `path` atomically (see the module doc). `metadata` goes to
/// `__metadata__`; `"format": "pt"` is added unless it sets `format`.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[WriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let (header, order) = layout(path, tensors, metadata)?;
    write_atomic(path, |w| {
        w.write_all(&header)?;
        order
            .iter()
            .try_for_each(|&i| w.write_all(&tensors[i].bytes))
    })
}

/// The whole file `write` would produce, in memory (for tests and hashing).
pub fn to_bytes(
    tensors: &[WriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let (mut out, order) = layout(Path::new("<in-memory safetensors>"), tensors, metadata)?;
    for i in order {
        out.extend_from_slice(&tensors[i].bytes);
    }
    Ok(out)
}

/// Validates the tensors and returns the length-prefixed, padded header and the data order.
fn layout(
    file: &Path,
    tensors: &[WriteTensor<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let bad = |t: &WriteTensor<'_>, reason: String| SafetensorsError::Entry {
        file: file.to_path_buf(),
        tensor: t.name.clone(),
        reason,
    };
    let mut seen = HashSet::new();
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(bad(t, "`__metadata__` is reserved for the metadata".into()));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(bad(t, "written more than once".into()));
        }
        let need = byte_size(t.dtype, &t.shape).map_err(|r| bad(t, r))?;
        if need != t.bytes.len() as u64 {
            return Err(bad(
                t,
                format!(
                    "dtype {} and shape {:?} need {need} bytes, but {} were given",
                    t.dtype,
                    t.shape,
                    t.bytes.len()
                ),
            ));
        }
    }
    // As the reference writer: dtype descending (larger elements first), then name.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&tensors[a], &tensors[b]);
        b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name))
    });

    // Built by hand to match the reference writer byte for byte: `__metadata__` first, then
    // the tensors in data order, each `{"dtype", "shape", "data_offsets"}` in that order.
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut json = String::from("{\"__metadata__\":{");
    for (i, (k, v)) in meta.iter().enumerate() {
        let comma = if i == 0 { "" } else { "," };
        json.push_str(&format!("{comma}{}:{}", quote(k), quote(v)));
    }
    json.push('}');
    let mut offset = 0usize;
    for &i in &order {
        let t = &tensors[i];
        let end = offset + t.bytes.len();
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        json.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            quote(&t.name),
            t.dtype.name(),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    let mut json = json.into_bytes();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, order))
}

/// Replaces `path` with what `fill` writes, atomically: `fill` writes a temporary file next to
/// `path`, which is flushed, fsynced and renamed over `path`; the directory is then fsynced so
/// the rename itself is durable. On any error the temporary file is removed and `path` is left
/// as it was.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |op, source| SafetensorsError::Io {
        file: path.to_path_buf(),
        op,
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io(
            "write",
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io("create a temporary file for", e))?;
        let mut w = BufWriter::new(f);
        fill(&mut w).map_err(|e| io("write", e))?;
        let f = w.into_inner().map_err(|e| io("write", e.into_error()))?;
        f.sync_all().map_err(|e| io("fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    #[cfg(unix)]
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync the directory of", e))?;
    tracing::debug!(file = %path.display(), "written atomically");
    Ok(())
}
