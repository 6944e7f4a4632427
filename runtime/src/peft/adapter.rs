//! The Hugging Face PEFT adapter directory for LoRA (RUNTIME.md §3.1–3.4), compatible with
//! peft 0.21: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! [`save_adapter`] writes both files atomically (temporary file, fsync, rename), weights
//! first so that a config never describes weights that are not there. [`load_adapter`] reads
//! an adapter written by us or by PEFT back into [`LoraParams`], and rejects — naming the file
//! and the key or tensor — anything it would otherwise silently get wrong: PEFT's own loader
//! turns a misspelt key into a no-op adapter (§3.4 step 3); ours refuses it.

use super::error::{PeftError, Result};
use super::lora::{tensor_key, LoraConfig, LoraFactor, LoraModule, LoraParams, LoraTarget};
use crate::checkpoint::WriteTensor;
use crate::checkpoint::{write_atomic, writer, Dtype, HostMatrix, OptConfig, SafeTensors};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;

/// The adapter's config file inside the directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file inside the directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's legacy pickle weights, which we never read or write.
const LEGACY_WEIGHTS_FILE: &str = "adapter_model.bin";

/// Writes `params` to the adapter directory `dir` (created if needed):
/// `adapter_model.safetensors` (F32, keys of §3.3, `__metadata__ {"format": "pt"}`) and
/// `adapter_config.json` (the keys peft 0.21 writes, sorted, indent 2, values of §3.2).
/// `base_model_name_or_path` is the hub id or path `AutoPeftModel*` will load the base from.
pub fn save_adapter(dir: &Path, params: &LoraParams, base_model_name_or_path: &str) -> Result<()> {
    params.config.validate()?;
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        file: dir.to_path_buf(),
        op: "create the adapter directory",
        source,
    })?;
    let tensors: Vec<WriteTensor<'_>> = params
        .tensors()
        .into_iter()
        .map(|(name, m)| WriteTensor {
            name,
            dtype: Dtype::F32,
            shape: m.shape().to_vec(),
            bytes: Cow::Owned(m.data.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    writer::write(dir.join(WEIGHTS_FILE), &tensors, &BTreeMap::new())?;

    let json = config_json(&params.config, base_model_name_or_path);
    write_atomic(&dir.join(CONFIG_FILE), |w| w.write_all(json.as_bytes()))?;
    tracing::info!(
        dir = %dir.display(),
        tensors = tensors.len(),
        parameters = params.num_parameters(),
        "PEFT LoRA adapter saved"
    );
    Ok(())
}

/// A JSON number for an f32 that prints as the decimal a person would have written
/// (`0.05`, not `0.05000000074505806`); integral values become integers when `int` is set.
fn json_number(x: f32, int: bool) -> Value {
    if int && x.fract() == 0.0 && x.abs() < 9.0e15 {
        return Value::from(x as i64);
    }
    // The shortest decimal that rounds back to `x`, read as f64.
    let x: f64 = x.to_string().parse().unwrap_or(f64::from(x));
    Value::from(x)
}

/// `adapter_config.json` as PEFT writes it: `json.dumps(fields, indent=2, sort_keys=True)`.
fn config_json(c: &LoraConfig, base_model_name_or_path: &str) -> String {
    let mut targets: Vec<&str> = c.targets.iter().map(|t| t.peft_name()).collect();
    targets.sort_unstable();
    let null = Value::Null;
    let empty = || Value::Object(Map::new());
    // Every field peft 0.21 writes for LoRA (§3.2); the ones we do not use have PEFT's
    // defaults. `peft_version` is left out: PEFT fills in its own.
    let fields: BTreeMap<&str, Value> = [
        ("alora_invocation_tokens", null.clone()),
        ("alpha_pattern", empty()),
        ("arrow_config", null.clone()),
        ("auto_mapping", null.clone()),
        (
            "base_model_name_or_path",
            Value::from(base_model_name_or_path),
        ),
        ("bias", Value::from("none")),
        ("corda_config", null.clone()),
        ("ensure_weight_tying", Value::from(false)),
        ("eva_config", null.clone()),
        ("exclude_modules", null.clone()),
        ("fan_in_fan_out", Value::from(false)),
        ("inference_mode", Value::from(true)),
        ("init_lora_weights", Value::from(true)),
        ("kasa_config", null.clone()),
        ("layer_replication", null.clone()),
        ("layers_pattern", null.clone()),
        ("layers_to_transform", null.clone()),
        ("loftq_config", empty()),
        ("lora_alpha", json_number(c.alpha, true)),
        ("lora_bias", Value::from(false)),
        ("lora_dropout", json_number(c.dropout, false)),
        ("lora_ga_config", null.clone()),
        ("megatron_config", null.clone()),
        ("megatron_core", Value::from("megatron.core")),
        ("modules_to_save", null.clone()),
        ("monteclora_config", null.clone()),
        ("peft_type", Value::from("LORA")),
        ("qalora_group_size", Value::from(16)),
        ("r", Value::from(c.r)),
        ("rank_pattern", empty()),
        ("revision", null.clone()),
        ("target_modules", Value::from(targets)),
        ("target_parameters", null.clone()),
        ("task_type", Value::from("CAUSAL_LM")),
        ("trainable_token_indices", null.clone()),
        ("use_bdlora", null.clone()),
        ("use_dora", Value::from(false)),
        ("use_qalora", Value::from(false)),
        ("use_rslora", Value::from(c.use_rslora)),
        ("velora_config", null),
    ]
    .into_iter()
    .collect();
    // Serialising a map of JSON values cannot fail; an empty object would be the fallback.
    let pretty = serde_json::to_string_pretty(&fields).unwrap_or_else(|_| "{}".into());
    ensure_ascii(&pretty)
}

/// Escapes what Python's `json.dumps(ensure_ascii=True)` escapes and serde_json does not:
/// every character outside `' '..='~'` as `\uXXXX` (UTF-16, lowercase hex). Such characters
/// only occur inside strings, where serde_json has already escaped quotes and control bytes.
fn ensure_ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if (ch as u32) < 0x7f {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for u in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// Reads the adapter directory `dir` for the model `model`. Tensors may be F32, F16 or BF16
/// (converted to f32). The config's `r`, `lora_alpha`, `lora_dropout`, `use_rslora` and
/// `target_modules` (short names, dotted suffixes of module paths, or `"all-linear"`) become
/// the [`LoraConfig`]; absent keys take PEFT's defaults (r 8, α 8, targets `q_proj, v_proj`).
pub fn load_adapter(dir: &Path, model: &OptConfig) -> Result<LoraParams> {
    let config_file = dir.join(CONFIG_FILE);
    let weights_file = dir.join(WEIGHTS_FILE);
    for file in [&config_file, &weights_file] {
        if !file.is_file() {
            let hint = if file == &weights_file && dir.join(LEGACY_WEIGHTS_FILE).is_file() {
                format!("; only the legacy pickle `{LEGACY_WEIGHTS_FILE}` is present, which is not supported (re-save with safe_serialization=True)")
            } else {
                String::new()
            };
            return Err(PeftError::MissingFile {
                file: file.clone(),
                hint,
            });
        }
    }
    let text = std::fs::read_to_string(&config_file).map_err(|source| PeftError::Io {
        file: config_file.clone(),
        op: "read",
        source,
    })?;
    let config = parse_config(&text, &config_file, model)?;
    let st = SafeTensors::open(&weights_file)?;
    from_parts(dir, config, &st, model)
}

/// [`load_adapter`] on an adapter held in memory: `config_json` is the text of
/// `adapter_config.json`, `weights` the bytes of `adapter_model.safetensors`, and `dir` only
/// names the files in errors. Same checks, without touching the file system (for tests and
/// fuzzing of the config parser and the weight checks).
pub fn load_adapter_from_bytes(
    dir: &Path,
    config_json: &str,
    weights: Vec<u8>,
    model: &OptConfig,
) -> Result<LoraParams> {
    let config = parse_config(config_json, &dir.join(CONFIG_FILE), model)?;
    let st = SafeTensors::from_bytes(dir.join(WEIGHTS_FILE), weights)?;
    from_parts(dir, config, &st, model)
}

/// Matches the weights file `st` against the parsed `config` and `model`: every tensor is a
/// targeted LoRA matrix with its shape, and every targeted matrix is there.
fn from_parts(
    dir: &Path,
    config: LoraConfig,
    st: &SafeTensors,
    model: &OptConfig,
) -> Result<LoraParams> {
    let weights_file = st.file().to_path_buf();
    // Every LoRA key this model could have, whether targeted or not.
    let mut known: HashMap<String, (usize, LoraTarget, LoraFactor)> = HashMap::new();
    for layer in 0..model.num_hidden_layers {
        for target in LoraTarget::ALL {
            for factor in [LoraFactor::A, LoraFactor::B] {
                known.insert(tensor_key(layer, target, factor), (layer, target, factor));
            }
        }
    }
    let r = config.r;
    let mut found: HashMap<(usize, LoraTarget, LoraFactor), HostMatrix> = HashMap::new();
    for view in st.tensors() {
        let name = view.name();
        let unexpected = |reason: String| PeftError::UnexpectedTensor {
            file: weights_file.clone(),
            tensor: name.to_owned(),
            reason,
        };
        let Some(&(layer, target, factor)) = known.get(name) else {
            return Err(unexpected(format!(
                "maps to no LoRA matrix of this model ({} layers; keys look like `{}`)",
                model.num_hidden_layers,
                tensor_key(0, LoraTarget::Q, LoraFactor::A)
            )));
        };
        if !config.targets.contains(&target) {
            return Err(unexpected(format!(
                "adapts `{}`, which is not in {CONFIG_FILE}'s target_modules",
                target.peft_name()
            )));
        }
        let (fan_in, fan_out) = target.dims(model);
        let expected = match factor {
            LoraFactor::A => [r, fan_in],
            LoraFactor::B => [fan_out, r],
        };
        if view.shape() != expected {
            return Err(PeftError::ShapeMismatch {
                file: weights_file.clone(),
                tensor: name.to_owned(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let m = HostMatrix {
            rows: expected[0],
            cols: expected[1],
            data: view.to_f32()?,
        };
        found.insert((layer, target, factor), m);
    }

    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    for layer in 0..model.num_hidden_layers {
        let mut modules = Vec::with_capacity(config.targets.len());
        for &target in &config.targets {
            let mut take = |factor| {
                found
                    .remove(&(layer, target, factor))
                    .ok_or_else(|| PeftError::MissingTensor {
                        file: weights_file.clone(),
                        tensor: tensor_key(layer, target, factor),
                        module: target.peft_name(),
                    })
            };
            let a = take(LoraFactor::A)?;
            let b = take(LoraFactor::B)?;
            modules.push((target, LoraModule { a, b }));
        }
        layers.push(modules);
    }
    tracing::info!(dir = %dir.display(), r, targets = ?config.targets, "PEFT LoRA adapter loaded");
    Ok(LoraParams { config, layers })
}

/// Parses `adapter_config.json` into a validated [`LoraConfig`] (targets in canonical order).
fn parse_config(text: &str, file: &Path, model: &OptConfig) -> Result<LoraConfig> {
    let bad = |reason: String| PeftError::Config {
        file: file.to_path_buf(),
        reason,
    };
    let unsupported = |key: &str, reason: String| PeftError::Unsupported {
        file: file.to_path_buf(),
        key: key.to_owned(),
        reason,
    };
    let root: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let obj = root
        .as_object()
        .ok_or_else(|| bad("the top level is not a JSON object".into()))?;
    // Absent and null both mean "PEFT's default".
    let get = |key: &str| obj.get(key).filter(|v| !v.is_null());

    match get("peft_type") {
        None => return Err(bad("missing `peft_type` (PEFT requires it)".into())),
        Some(Value::String(t)) if t == "LORA" => {}
        Some(Value::String(t)) => {
            return Err(PeftError::NotLora {
                file: file.to_path_buf(),
                peft_type: t.clone(),
            })
        }
        Some(v) => return Err(bad(format!("`peft_type` must be a string, found {v}"))),
    }
    let flag = |key: &str| match get(key) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(format!("`{key}` must be true or false, found {v}"))),
    };
    for (key, what) in [
        ("use_dora", "DoRA (use_dora = true)"),
        ("lora_bias", "a bias on lora_B (lora_bias = true)"),
        ("fan_in_fan_out", "fan_in_fan_out = true (Conv1D weights)"),
    ] {
        if flag(key)? {
            return Err(unsupported(key, what.into()));
        }
    }
    let use_rslora = flag("use_rslora")?;
    match get("bias") {
        None => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(v) => {
            return Err(unsupported(
                "bias",
                format!("training biases (bias = {v}; only \"none\" is read)"),
            ))
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        match get(key) {
            None => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(unsupported(
                    key,
                    format!("a per-module override {v} (not implemented yet)"),
                ))
            }
        }
    }
    for key in [
        "modules_to_save",
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
    ] {
        let empty = match get(key) {
            None => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::String(s)) => s.is_empty(),
            Some(_) => false,
        };
        if !empty {
            return Err(unsupported(key, format!("{key} = {}", obj[key])));
        }
    }
    let layers = model.num_hidden_layers;
    let all_layers = match get("layers_to_transform") {
        None => true,
        Some(Value::Number(n)) => layers == 1 && n.as_u64() == Some(0),
        Some(Value::Array(a)) => {
            let set: BTreeSet<Option<u64>> = a.iter().map(Value::as_u64).collect();
            set == (0..layers as u64).map(Some).collect()
        }
        Some(_) => false,
    };
    if !all_layers {
        return Err(unsupported(
            "layers_to_transform",
            format!("adapting only some layers ({})", obj["layers_to_transform"]),
        ));
    }

    let r = match get("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .filter(|&r| r > 0)
            .ok_or_else(|| bad(format!("`r` must be a positive integer, found {v}")))?
            as usize,
    };
    let number = |key: &str, default: f32| match get(key) {
        None => Ok(default),
        Some(v) => v
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| bad(format!("`{key}` must be a number, found {v}"))),
    };
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)?;
    let targets = parse_targets(get("target_modules"), model, &bad, &unsupported)?;

    let config = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// `target_modules` → the targets, in canonical order. A list entry matches a module whose
/// full path equals it or ends with `"." + entry` (PEFT's rule); every entry must match
/// something, and each matched target must be matched in every layer.
fn parse_targets(
    value: Option<&Value>,
    model: &OptConfig,
    bad: &dyn Fn(String) -> PeftError,
    unsupported: &dyn Fn(&str, String) -> PeftError,
) -> Result<Vec<LoraTarget>> {
    const KEY: &str = "target_modules";
    let entries: Vec<&str> = match value {
        // PEFT's default for OPT.
        None => return Ok(vec![LoraTarget::Q, LoraTarget::V]),
        Some(Value::String(s)) if s == "all-linear" => return Ok(LoraTarget::ALL.to_vec()),
        Some(Value::String(s)) => {
            return Err(unsupported(
                KEY,
                format!("a regular expression (`{s}`) instead of a list of module names"),
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| bad(format!("`{KEY}` entries must be strings, found {v}")))
            })
            .collect::<Result<_>>()?,
        Some(v) => {
            return Err(bad(format!(
                "`{KEY}` must be a list of module names, found {v}"
            )))
        }
    };
    let layers = model.num_hidden_layers;
    let mut hits: BTreeSet<(LoraTarget, usize)> = BTreeSet::new();
    for entry in entries {
        let suffix = format!(".{entry}");
        let mut any = false;
        for layer in 0..layers {
            for target in LoraTarget::ALL {
                let path = target.module_path(layer);
                if path == entry || path.ends_with(&suffix) {
                    hits.insert((target, layer));
                    any = true;
                }
            }
        }
        if !any {
            return Err(unsupported(
                KEY,
                format!(
                    "adapting `{entry}` (it names no q_proj, k_proj, v_proj, out_proj, fc1 or \
                     fc2 module of this model)"
                ),
            ));
        }
    }
    let mut targets = Vec::new();
    for target in LoraTarget::ALL {
        let n = hits.iter().filter(|(t, _)| *t == target).count();
        if n == layers {
            targets.push(target);
        } else if n > 0 {
            return Err(unsupported(
                KEY,
                format!(
                    "adapting `{}` in only {n} of the {layers} layers",
                    target.peft_name()
                ),
            ));
        }
    }
    Ok(targets)
}
