//! The directory conventions shared by the PEFT methods that have no PEFT type of their own
//! (BitFit, Houlsby adapters; RUNTIME.md §3.6): one F32 safetensors file of trainable tensors
//! under their Hugging Face names, and one small JSON config next to it, both written
//! atomically (weights first, so a config never describes weights that are not there).

use super::error::{PeftError, Result};
use crate::checkpoint::{write_atomic, writer, Dtype, HostMatrix, SafeTensors, WriteTensor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The `format` every config of ours carries, so that a reader can tell it from PEFT's.
pub const FORMAT: &str = "lexp";

/// Writes `tensors` (name, value, shape in the file) as F32 to `dir/weights_file` and the JSON
/// object `config` (plus `"format": "lexp"`) to `dir/config_file`; `dir` is created if needed.
pub fn write_dir(
    dir: &Path,
    weights_file: &str,
    tensors: &[(String, &HostMatrix, Vec<usize>)],
    config_file: &str,
    mut config: Map<String, Value>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        file: dir.to_path_buf(),
        op: "create the adapter directory",
        source,
    })?;
    let out: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|(name, m, shape)| WriteTensor {
            name: name.clone(),
            dtype: Dtype::F32,
            shape: shape.clone(),
            bytes: Cow::Owned(m.data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    writer::write(dir.join(weights_file), &out, &BTreeMap::new())?;
    config.insert("format".into(), Value::from(FORMAT));
    let sorted: BTreeMap<String, Value> = config.into_iter().collect();
    // Serialising a map of JSON values cannot fail; an empty object would be the fallback.
    let text = serde_json::to_string_pretty(&sorted).unwrap_or_else(|_| "{}".into());
    write_atomic(&dir.join(config_file), |w| w.write_all(text.as_bytes()))?;
    Ok(())
}

/// Reads `dir/config_file` (a JSON object with `"format": "lexp"` and `"peft_type"` equal to
/// `peft_type`) and opens `dir/weights_file`.
pub fn read_dir(
    dir: &Path,
    weights_file: &str,
    config_file: &str,
    peft_type: &str,
) -> Result<(Map<String, Value>, SafeTensors)> {
    let config_path = dir.join(config_file);
    let weights_path = dir.join(weights_file);
    for file in [&config_path, &weights_path] {
        if !file.is_file() {
            return Err(PeftError::MissingFile {
                file: file.clone(),
                hint: String::new(),
            });
        }
    }
    let text = std::fs::read_to_string(&config_path).map_err(|source| PeftError::Io {
        file: config_path.clone(),
        op: "read",
        source,
    })?;
    let bad = |reason: String| PeftError::Config {
        file: config_path.clone(),
        reason,
    };
    let root: Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Value::Object(obj) = root else {
        return Err(bad("the top level is not a JSON object".into()));
    };
    match obj.get("peft_type").and_then(Value::as_str) {
        Some(t) if t == peft_type => {}
        other => {
            return Err(bad(format!(
                "`peft_type` is {other:?}, expected \"{peft_type}\""
            )))
        }
    }
    let st = SafeTensors::open(&weights_path)?;
    Ok((obj, st))
}

/// The tensor `name` of `st` as a `[rows, cols]` matrix; an error naming the file and the
/// tensor when it is absent or its number of elements differs (`shape` is what the file
/// must say).
pub fn take(
    st: &SafeTensors,
    name: &str,
    shape: &[usize],
    rows: usize,
    cols: usize,
) -> Result<HostMatrix> {
    let file = st.file().to_path_buf();
    let view = st.tensor(name).ok_or_else(|| PeftError::UnexpectedTensor {
        file: file.clone(),
        tensor: name.to_owned(),
        reason: "is missing".into(),
    })?;
    if view.shape() != shape {
        return Err(PeftError::ShapeMismatch {
            file,
            tensor: name.to_owned(),
            expected: shape.to_vec(),
            found: view.shape().to_vec(),
        });
    }
    Ok(HostMatrix {
        rows,
        cols,
        data: view.to_f32()?,
    })
}

/// An error when `st` holds a tensor outside `expected` (names in the file that this model
/// and config do not know).
pub fn no_extra(st: &SafeTensors, expected: &[String]) -> Result<()> {
    for name in st.names() {
        if !expected.iter().any(|e| e == name) {
            return Err(PeftError::UnexpectedTensor {
                file: st.file().to_path_buf(),
                tensor: name.to_owned(),
                reason: "is not a trainable tensor of this model and config".into(),
            });
        }
    }
    Ok(())
}

/// The config value `key` as a JSON value, or an error naming the key and the file.
pub fn key<'a>(obj: &'a Map<String, Value>, key: &str, file: &Path) -> Result<&'a Value> {
    obj.get(key).ok_or_else(|| PeftError::Config {
        file: file.to_path_buf(),
        reason: format!("missing `{key}`"),
    })
}
