//! Merging trained PEFT parameters into a plain Hugging Face checkpoint (RUNTIME.md §3.5,
//! `lexp merge`): each LoRA module is folded into its base weight, `W' = W + s·(B·A)`, and
//! BitFit's biases replace the base ones; both computed in f32 and rounded once to the base
//! tensor's storage dtype. Every other tensor is copied byte for byte, under the same name
//! and shape, so the result loads with `AutoModelForCausalLM.from_pretrained` like the base.
//!
//! Houlsby adapters hold a nonlinearity and cannot be merged (RUNTIME.md §2.7): asking for it
//! is an error before anything is written.
//!
//! The output directory gets `model.safetensors` (one file, written atomically) and a copy of
//! every other file of the base directory (`config.json`, tokenizer files, …) except its
//! weights; it must not hold a checkpoint already.

use super::bitfit::BiasSite;
use super::error::{PeftError, Result};
use super::lora::LoraTarget;
use super::params::PeftParams;
use crate::checkpoint::opt::PREFIXES;
use crate::checkpoint::{encode_f32, writer, Checkpoint, HostMatrix, OptModel, WriteTensor};
use crate::cpu::matmul::matmul;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The merged checkpoint's weights file.
pub const MERGED_WEIGHTS_FILE: &str = "model.safetensors";

/// What a merge changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Base weights LoRA changed.
    pub lora_weights: usize,
    /// Biases BitFit replaced.
    pub biases: usize,
    /// Files copied from the base directory.
    pub copied_files: Vec<String>,
}

/// The new f32 value of each tensor the merge changes, keyed by its name without the
/// checkpoint's prefix (`layers.0.self_attn.q_proj.weight`).
fn merged_values(params: &PeftParams, model: &OptModel) -> Result<HashMap<String, Vec<f32>>> {
    if params.houlsby.is_some() {
        return Err(PeftError::NotMergeable {
            reason: "Houlsby adapters hold a nonlinearity and cannot be folded into the base \
                     weights; evaluate them with `lexp eval --adapter DIR` instead"
                .into(),
        });
    }
    let unprefixed = |key: &str| {
        key.strip_prefix("model.decoder.")
            .unwrap_or(key)
            .to_string()
    };
    let mut out = HashMap::new();
    if let Some(lora) = &params.lora {
        let s = lora.config.scaling();
        for (layer, target, m) in lora.modules() {
            let l = &model.weights.layers[layer];
            let lin = match target {
                LoraTarget::Q => &l.q_proj,
                LoraTarget::K => &l.k_proj,
                LoraTarget::V => &l.v_proj,
                LoraTarget::Out => &l.out_proj,
                LoraTarget::Fc1 => &l.fc1,
                LoraTarget::Fc2 => &l.fc2,
            };
            let HostMatrix { rows, cols, data } = &lin.weight;
            let mut w = data.clone();
            // W [out, in] += s · B [out, r] · A [r, in].
            matmul(
                &mut w, &m.b.data, &m.a.data, *rows, m.b.cols, *cols, false, false, s, 1.0,
            );
            out.insert(
                unprefixed(&format!("{}.weight", target.module_path(layer))),
                w,
            );
        }
    }
    if let Some(b) = &params.bitfit {
        for (i, l) in b.layers.iter().enumerate() {
            for site in BiasSite::ALL {
                if let Some(m) = &l[site.index()] {
                    out.insert(unprefixed(&site.key(i)), m.data.clone());
                }
            }
        }
        if let Some(m) = &b.final_ln {
            out.insert(unprefixed(super::bitfit::FINAL_LN_BIAS), m.data.clone());
        }
    }
    Ok(out)
}

/// Merges `params` into the base checkpoint in `base_dir` (whose weights `model` holds) and
/// writes the result to `out_dir`.
pub fn merge(
    base_dir: &Path,
    model: &OptModel,
    params: &PeftParams,
    out_dir: &Path,
) -> Result<MergeReport> {
    let mut values = merged_values(params, model)?;
    let io = |file: &Path, op: &'static str| {
        let file = file.to_path_buf();
        move |source| PeftError::Io { file, op, source }
    };
    if out_dir.join(MERGED_WEIGHTS_FILE).exists() || out_dir.join("config.json").exists() {
        return Err(PeftError::OutputExists {
            dir: out_dir.to_path_buf(),
        });
    }
    let ckpt = Checkpoint::open(base_dir)?;
    let prefix = PREFIXES
        .into_iter()
        .find(|p| ckpt.contains(&format!("{p}embed_tokens.weight")))
        .unwrap_or(PREFIXES[0]);
    let (mut lora_weights, mut biases) = (0, 0);
    let mut tensors: Vec<WriteTensor<'_>> = vec![];
    for name in ckpt.names() {
        let Some(view) = ckpt.tensor(name) else {
            continue;
        };
        let key = name.strip_prefix(prefix).unwrap_or(name);
        match values.remove(key) {
            Some(v) => {
                if v.len() != view.numel() {
                    return Err(PeftError::UnexpectedTensor {
                        file: ckpt.source().to_path_buf(),
                        tensor: name.to_owned(),
                        reason: format!(
                            "has {} elements but the trained tensor {}",
                            view.numel(),
                            v.len()
                        ),
                    });
                }
                if key.ends_with(".weight") {
                    lora_weights += 1;
                } else {
                    biases += 1;
                }
                let bytes =
                    encode_f32(&v, view.dtype()).ok_or_else(|| PeftError::UnexpectedTensor {
                        file: ckpt.source().to_path_buf(),
                        tensor: name.to_owned(),
                        reason: format!("has dtype {:?}, which a merge cannot write", view.dtype()),
                    })?;
                tensors.push(WriteTensor {
                    name: name.to_owned(),
                    dtype: view.dtype(),
                    shape: view.shape().to_vec(),
                    bytes: Cow::Owned(bytes),
                });
            }
            None => tensors.push(WriteTensor::from(view)),
        }
    }
    if let Some(missing) = values.keys().next() {
        return Err(PeftError::UnexpectedTensor {
            file: ckpt.source().to_path_buf(),
            tensor: format!("{prefix}{missing}"),
            reason: "is trained but not in the base checkpoint".into(),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir, "create the output directory"))?;
    let mut copied_files = vec![];
    let entries = std::fs::read_dir(base_dir).map_err(io(base_dir, "list"))?;
    for entry in entries {
        let entry = entry.map_err(io(base_dir, "list"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".index.json");
        if weights || !entry.path().is_file() {
            continue;
        }
        let to = out_dir.join(&name);
        std::fs::copy(entry.path(), &to).map_err(io(&to, "copy into"))?;
        copied_files.push(name);
    }
    copied_files.sort();
    writer::write(
        out_dir.join(MERGED_WEIGHTS_FILE),
        &tensors,
        &BTreeMap::new(),
    )?;
    let report = MergeReport {
        tensors: tensors.len(),
        lora_weights,
        biases,
        copied_files,
    };
    tracing::info!(out = %out_dir.display(), ?report, "merged checkpoint written");
    Ok(report)
}
