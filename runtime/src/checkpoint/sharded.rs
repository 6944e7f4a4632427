//! A Hugging Face checkpoint directory: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json` (RUNTIME.md §4.5).

use super::error::{CheckpointError, Result};
use super::json::{first_duplicate, Json};
use super::safetensors::{SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

/// File name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint directory, across all its safetensors files, each file
/// validated and memory-mapped. For a sharded checkpoint the index and the shards are checked
/// against each other: every listed shard exists, holds exactly the tensors mapped to it, and no
/// tensor is in two shards.
#[derive(Debug)]
pub struct Checkpoint {
    source: PathBuf,
    sharded: bool,
    shards: Vec<SafeTensors>,
    /// Tensor name → index into `shards`.
    location: HashMap<String, usize>,
}

impl Checkpoint {
    /// Opens the checkpoint in `dir`: the index if there is one (preferred when both exist,
    /// as transformers does), else `model.safetensors`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            if single.is_file() {
                tracing::debug!(dir = %dir.display(), "both {INDEX_FILE} and {SINGLE_FILE}: using the index");
            }
            Self::open_index(index)
        } else if single.is_file() {
            Self::open_file(single)
        } else {
            Err(CheckpointError::NoWeights { dir: dir.into() })
        }
    }

    /// A checkpoint of one safetensors file.
    pub fn open_file(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let file = SafeTensors::open(path)?;
        let location = file.names().map(|n| (n.to_owned(), 0)).collect();
        Ok(Checkpoint {
            source: file.file().to_path_buf(),
            sharded: false,
            shards: vec![file],
            location,
        })
    }

    /// A sharded checkpoint from its `model.safetensors.index.json`; shards are looked up next
    /// to the index.
    pub fn open_index(index: impl AsRef<Path>) -> Result<Checkpoint> {
        let index = index.as_ref();
        let dir = index.parent().unwrap_or(Path::new(""));
        let text = std::fs::read_to_string(index).map_err(|source| CheckpointError::Io {
            file: index.into(),
            op: "read",
            source,
        })?;
        Self::from_index(index, &text, |shard| {
            let path = dir.join(shard);
            if !path.is_file() {
                return Ok(None);
            }
            Ok(Some(SafeTensors::open(&path)?))
        })
    }

    /// A sharded checkpoint held in memory: `index_json` is the text of the index `index`
    /// (which only names it in errors), `shards` maps each shard's file name to its bytes.
    /// Validation is exactly [`open_index`](Self::open_index)'s; a shard the index lists but
    /// `shards` lacks is a [`MissingShard`](CheckpointError::MissingShard) error. For tests and
    /// fuzzing of the index and shard checks without files.
    pub fn from_index_bytes(
        index: impl AsRef<Path>,
        index_json: &str,
        mut shards: HashMap<String, Vec<u8>>,
    ) -> Result<Checkpoint> {
        let index = index.as_ref();
        let dir = index.parent().unwrap_or(Path::new(""));
        Self::from_index(index, index_json, |shard| {
            Ok(match shards.remove(shard) {
                Some(bytes) => Some(SafeTensors::from_bytes(dir.join(shard), bytes)?),
                None => None,
            })
        })
    }

    /// Parses the index text and cross-checks it with the shards `load` returns by file name
    /// (`None`: no such shard).
    fn from_index(
        index: &Path,
        text: &str,
        mut load: impl FnMut(&str) -> Result<Option<SafeTensors>>,
    ) -> Result<Checkpoint> {
        let (weight_map, total_size) = parse_index(index, text)?;

        // Shard file name → the tensors mapped to it, both sorted.
        let mut by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in &weight_map {
            by_shard.entry(shard).or_default().push(tensor);
        }
        let mut shards = Vec::with_capacity(by_shard.len());
        let mut location = HashMap::with_capacity(weight_map.len());
        for (shard_name, tensors) in by_shard {
            let Some(file) = load(shard_name)? else {
                return Err(CheckpointError::MissingShard {
                    index: index.into(),
                    shard: shard_name.into(),
                    tensor: tensors.first().copied().unwrap_or_default().into(),
                });
            };
            let path = file.file().to_path_buf();
            if let Some(t) = tensors.iter().find(|t| !file.contains(t)) {
                return Err(CheckpointError::NotInShard {
                    shard: path,
                    tensor: (*t).into(),
                    index: index.into(),
                });
            }
            if let Some(t) = file
                .names()
                .find(|t| weight_map.get(*t).map(String::as_str) != Some(shard_name))
            {
                return Err(CheckpointError::Unmapped {
                    shard: path.clone(),
                    tensor: t.into(),
                    index: index.into(),
                    mapped_to: weight_map.get(t).cloned(),
                });
            }
            location.extend(tensors.iter().map(|t| ((*t).to_owned(), shards.len())));
            shards.push(file);
        }

        let bytes: u64 = shards
            .iter()
            .flat_map(|s| s.tensors())
            .map(|t| t.bytes().len() as u64)
            .sum();
        if let Some(total) = total_size.filter(|&t| t != bytes) {
            tracing::warn!(
                index = %index.display(),
                "metadata.total_size is {total} but the shards' tensors hold {bytes} bytes"
            );
        }
        tracing::debug!(index = %index.display(), shards = shards.len(), tensors = location.len(), "sharded checkpoint opened");
        Ok(Checkpoint {
            source: index.into(),
            sharded: true,
            shards,
            location,
        })
    }

    /// The index file (sharded) or the single safetensors file: what errors about the
    /// checkpoint as a whole name.
    pub fn source(&self) -> &Path {
        &self.source
    }
    /// Whether the checkpoint came from an index.
    pub fn is_sharded(&self) -> bool {
        self.sharded
    }
    /// The safetensors files.
    pub fn shards(&self) -> &[SafeTensors] {
        &self.shards
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.location.len()
    }
    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.location.is_empty()
    }
    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.location.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
    /// Whether the checkpoint has a tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }
    /// The tensor `name`, from whichever shard holds it.
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.shards[*self.location.get(name)?].tensor(name)
    }
}

/// Parses an index's text: its `weight_map` (tensor → shard file name) and
/// `metadata.total_size`; `index` names the file in errors.
fn parse_index(index: &Path, text: &str) -> Result<(BTreeMap<String, String>, Option<u64>)> {
    let bad = |reason: String| CheckpointError::Index {
        file: index.into(),
        reason,
    };
    let top = match Json::parse(text) {
        Ok(Json::Object(entries)) => entries,
        Ok(other) => return Err(bad(format!("expected an object, found {}", other.kind()))),
        Err(e) => return Err(bad(format!("not valid JSON: {e}"))),
    };
    if let Some(dup) = first_duplicate(&top) {
        return Err(bad(format!("key `{dup}` appears more than once")));
    }
    let mut weight_map = None;
    let mut total_size = None;
    for (key, value) in top {
        match (key.as_str(), value) {
            ("weight_map", Json::Object(map)) => weight_map = Some(map),
            ("weight_map", other) => {
                return Err(bad(format!(
                    "`weight_map` must be an object, found {}",
                    other.kind()
                )))
            }
            ("metadata", Json::Object(meta)) => {
                total_size = meta.into_iter().find_map(|(k, v)| match v {
                    Json::UInt(n) if k == "total_size" => Some(n),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    let map = weight_map.ok_or_else(|| bad("no `weight_map`".into()))?;
    if let Some(dup) = first_duplicate(&map) {
        return Err(bad(format!(
            "tensor `{dup}` is listed more than once in `weight_map` (one tensor, one shard)"
        )));
    }
    let mut weight_map = BTreeMap::new();
    for (tensor, shard) in map {
        let Json::String(shard) = shard else {
            return Err(bad(format!(
                "tensor `{tensor}`: the shard must be a file name, found {}",
                shard.kind()
            )));
        };
        let mut parts = Path::new(&shard).components();
        if !matches!(
            (parts.next(), parts.next()),
            (Some(Component::Normal(_)), None)
        ) {
            return Err(bad(format!(
                "tensor `{tensor}`: shard `{shard}` is not a file name in the checkpoint's directory"
            )));
        }
        weight_map.insert(tensor, shard);
    }
    Ok((weight_map, total_size))
}
