//! The embedded default run: the bundled `opt-tiny` model and E2E slice (`assets/default/`,
//! see `assets/README.md` for their origin and licenses), compiled into the binary so that
//! `lexp finetune` with no arguments works on a machine with nothing downloaded.
//!
//! The files are unpacked once into a cache directory (`$LEXP_CACHE`, else
//! `$XDG_CACHE_HOME/lexp`, else `~/.cache/lexp`, else the temp dir) named by a checksum of the
//! bundle, each written atomically, so concurrent or interrupted first runs are harmless.

use super::state::{fnv1a64, write_file_atomic};
use std::path::{Path, PathBuf};

macro_rules! asset {
    ($path:literal) => {
        (
            $path,
            include_bytes!(concat!("../../../assets/default/", $path)) as &[u8],
        )
    };
}

/// `(relative path, bytes)` of every bundled file.
const FILES: [(&str, &[u8]); 7] = [
    asset!("opt-tiny/config.json"),
    asset!("opt-tiny/generation_config.json"),
    asset!("opt-tiny/model.safetensors"),
    asset!("opt-tiny/tokenizer.json"),
    asset!("opt-tiny/pretrain_report.json"),
    asset!("e2e/train.jsonl"),
    asset!("e2e/eval.jsonl"),
];

/// Where the unpacked default lives.
#[derive(Clone, Debug)]
pub struct DefaultAssets {
    /// The model directory.
    pub model_dir: PathBuf,
    /// Training data.
    pub train: PathBuf,
    /// Eval data.
    pub eval: PathBuf,
}

/// The cache root used when `dir` is not given.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("LEXP_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lexp");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache").join("lexp");
    }
    std::env::temp_dir().join("lexp-cache")
}

/// Unpacks the bundle under `root` (if not already there) and returns its paths.
pub fn unpack(root: &Path) -> std::io::Result<DefaultAssets> {
    let sum = FILES.iter().fold(0u64, |h, (name, bytes)| {
        h.rotate_left(7) ^ fnv1a64(name.as_bytes()) ^ fnv1a64(bytes)
    });
    let dir = root.join(format!("default-{sum:016x}"));
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let present = std::fs::metadata(&path).map(|m| m.len() == bytes.len() as u64);
        if present.unwrap_or(false) {
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        write_file_atomic(&path, bytes)?;
    }
    Ok(DefaultAssets {
        model_dir: dir.join("opt-tiny"),
        train: dir.join("e2e/train.jsonl"),
        eval: dir.join("e2e/eval.jsonl"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpacks_a_loadable_model_and_data() {
        let root = std::env::temp_dir().join(format!("lexp-embedded-{}", std::process::id()));
        let a = unpack(&root).unwrap();
        // A second unpack finds everything in place.
        let b = unpack(&root).unwrap();
        assert_eq!(a.model_dir, b.model_dir);
        let config =
            crate::checkpoint::OptConfig::from_file(a.model_dir.join("config.json")).unwrap();
        assert_eq!(config.num_hidden_layers, 4);
        assert_eq!(config.hidden_size, 192);
        let lines = std::fs::read_to_string(&a.train).unwrap().lines().count();
        assert_eq!(lines, 1168);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
