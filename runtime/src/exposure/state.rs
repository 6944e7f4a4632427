//! MLP exposure's training state in a checkpoint (`exposure.safetensors`): every layer's
//! predictor (its parameters, their Adam moments, the mass scale and Adam's step) and mass
//! target. The guard moves the targets and refreshes the predictors during a run; with this
//! file a resumed run continues from where they were instead of from freshly trained
//! predictors and the initial targets, so it ends where an uninterrupted run would.
//!
//! Tensors are `layer.{l}.{w1|b1|w2|b2}[.m|.v]` (f32); the metadata holds `layers`,
//! `targets` (JSON), and per layer `layer.{l}.scale` and `layer.{l}.step`.

use super::sparse_mlp::SparseMlp;
use crate::checkpoint::{writer, Dtype, SafeTensors, WriteTensor};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// The file's name in a checkpoint directory.
pub const FILE: &str = "exposure.safetensors";

/// Writes `hook`'s predictors and targets to `path` (atomically).
pub fn save(path: &Path, hook: &SparseMlp) -> Result<(), String> {
    let predictors = hook.predictors();
    let mut tensors = vec![];
    let mut meta = BTreeMap::new();
    meta.insert("layers".to_string(), predictors.len().to_string());
    let targets = serde_json::to_string(&hook.targets()).map_err(|e| e.to_string())?;
    meta.insert("targets".to_string(), targets);
    for (l, p) in predictors.iter().enumerate() {
        let (parts, scale, step) = p.training_state();
        meta.insert(format!("layer.{l}.scale"), scale.to_string());
        meta.insert(format!("layer.{l}.step"), step.to_string());
        for (name, values) in parts {
            tensors.push(WriteTensor {
                name: format!("layer.{l}.{name}"),
                dtype: Dtype::F32,
                shape: vec![values.len()],
                bytes: Cow::Owned(values.iter().flat_map(|x| x.to_le_bytes()).collect()),
            });
        }
    }
    writer::write(path, &tensors, &meta).map_err(|e| format!("{}: {e}", path.display()))
}

/// Restores `hook`'s predictors and targets from `path`. On any error (named with the file and
/// the tensor or key) `hook` is unchanged.
pub fn load(path: &Path, hook: &SparseMlp) -> Result<(), String> {
    let at = |what: String| format!("{}: {what}", path.display());
    let st = SafeTensors::open(path).map_err(|e| at(e.to_string()))?;
    let meta = |key: &str| -> Result<&str, String> {
        st.metadata()
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| at(format!("metadata `{key}` is missing")))
    };
    let parse = |key: &str| -> Result<f64, String> {
        let v = meta(key)?;
        v.parse()
            .map_err(|_| at(format!("metadata `{key}` = `{v}` is not a number")))
    };
    let layers = parse("layers")? as usize;
    if layers != hook.layers() {
        return Err(at(format!(
            "{layers} layers of predictors for a model of {}",
            hook.layers()
        )));
    }
    let targets: Vec<f64> = serde_json::from_str(meta("targets")?)
        .map_err(|e| at(format!("metadata `targets`: {e}")))?;
    if targets.len() != layers || targets.iter().any(|&t| !(t > 0.0 && t <= 1.0)) {
        return Err(at(format!("metadata `targets` = {targets:?}")));
    }
    let mut predictors = hook.predictors();
    for (l, p) in predictors.iter_mut().enumerate() {
        let scale = parse(&format!("layer.{l}.scale"))? as f32;
        let step = parse(&format!("layer.{l}.step"))? as i32;
        p.restore_training_state(
            |name| {
                st.tensor(&format!("layer.{l}.{name}"))
                    .and_then(|v| v.to_f32().ok())
            },
            scale,
            step,
        )
        .map_err(|e| at(format!("layer {l}: {e}")))?;
    }
    hook.set_predictors(predictors)
        .map_err(|e| at(e.to_string()))?;
    hook.set_targets(&targets);
    Ok(())
}
