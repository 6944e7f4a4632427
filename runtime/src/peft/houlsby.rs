//! Houlsby bottleneck adapters (RUNTIME.md §2.7): two per decoder layer, one on the attention
//! block's output (after `out_proj` and its bias, before the residual dropout and add) and one
//! on the MLP's output (after `fc2`). With `h` the sub-block output, bottleneck `m`:
//!
//! ```text
//! r = h·W_dᵀ + b_d;   g = f(r);   out = h + g·W_uᵀ + b_u
//! ```
//!
//! Initialised near the identity: `W_u = 0`, `b_u = 0`, `b_d = 0`, and `W_d` drawn like LoRA's
//! `A` (`U(−1/√H, 1/√H)`, kaiming-uniform with `a = √5`), so the first step already moves
//! `W_u`. An adapter holds a nonlinearity: it cannot be merged into the base weights and has
//! no PEFT type. Export ([`save_houlsby`]) is RUNTIME.md §3.6's layout:
//! `houlsby_model.safetensors` (F32,
//! `model.decoder.layers.{i}.{attn,mlp}_adapter.{down,up}.{weight,bias}`, shapes `[m, H]`,
//! `[m]`, `[H, m]`, `[H]`) and `houlsby_config.json` (`peft_type "HOULSBY"`, `bottleneck`,
//! `activation`, `placement "houlsby"`, `base_model_name_or_path`, `format "lexp"`).

use super::error::{PeftError, Result};
use super::files;
use crate::checkpoint::{HostMatrix, OptConfig};
use crate::data::SplitMix64;
use serde_json::{Map, Value};
use std::path::Path;

/// Houlsby adapters' weights file inside an adapter directory.
pub const HOULSBY_WEIGHTS_FILE: &str = "houlsby_model.safetensors";
/// Houlsby adapters' config file inside an adapter directory.
pub const HOULSBY_CONFIG_FILE: &str = "houlsby_config.json";
/// `peft_type` of [`HOULSBY_CONFIG_FILE`].
pub const HOULSBY_TYPE: &str = "HOULSBY";

/// The adapter's nonlinearity `f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterActivation {
    /// `max(r, 0)`.
    Relu,
    /// GELU, tanh approximation (`gelu_new`, `nn.GELU(approximate="tanh")`).
    Gelu,
}

impl AdapterActivation {
    /// The name used in configs and on the command line (`relu`, `gelu`).
    pub fn name(self) -> &'static str {
        match self {
            AdapterActivation::Relu => "relu",
            AdapterActivation::Gelu => "gelu",
        }
    }

    /// The activation named `name`, if any.
    pub fn from_name(name: &str) -> Option<AdapterActivation> {
        [AdapterActivation::Relu, AdapterActivation::Gelu]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// Where in a layer an adapter sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterSite {
    /// On the attention block's output.
    Attention,
    /// On the MLP's output.
    Mlp,
}

impl AdapterSite {
    /// Both sites, in canonical order.
    pub const ALL: [AdapterSite; 2] = [AdapterSite::Attention, AdapterSite::Mlp];

    /// Position in [`AdapterSite::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The adapter's module path in decoder layer `layer`.
    pub fn module_path(self, layer: usize) -> String {
        let name = match self {
            AdapterSite::Attention => "attn_adapter",
            AdapterSite::Mlp => "mlp_adapter",
        };
        format!("model.decoder.layers.{layer}.{name}")
    }
}

/// Houlsby adapter hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct HoulsbyConfig {
    /// Bottleneck width `m` (> 0).
    pub bottleneck: usize,
    /// The nonlinearity.
    pub activation: AdapterActivation,
}

impl Default for HoulsbyConfig {
    /// `m = 64`, ReLU.
    fn default() -> Self {
        HoulsbyConfig {
            bottleneck: 64,
            activation: AdapterActivation::Relu,
        }
    }
}

impl HoulsbyConfig {
    /// Rejects a zero bottleneck.
    pub fn validate(&self) -> Result<()> {
        if self.bottleneck == 0 {
            return Err(PeftError::InvalidConfig {
                reason: "the adapter bottleneck must be positive".into(),
            });
        }
        Ok(())
    }
}

/// One adapter's trainable tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct HoulsbyModule {
    /// `W_d`, `[m, H]`.
    pub down: HostMatrix,
    /// `b_d`, `[1, m]`.
    pub down_bias: HostMatrix,
    /// `W_u`, `[H, m]`.
    pub up: HostMatrix,
    /// `b_u`, `[1, H]`.
    pub up_bias: HostMatrix,
}

impl HoulsbyModule {
    /// The four tensors with their names under `path` and their shapes in the export file,
    /// in canonical order (`down.weight`, `down.bias`, `up.weight`, `up.bias`).
    fn named(&self, path: &str) -> [(String, &HostMatrix, Vec<usize>); 4] {
        [
            (
                format!("{path}.down.weight"),
                &self.down,
                self.down.shape().to_vec(),
            ),
            (
                format!("{path}.down.bias"),
                &self.down_bias,
                vec![self.down_bias.cols],
            ),
            (
                format!("{path}.up.weight"),
                &self.up,
                self.up.shape().to_vec(),
            ),
            (
                format!("{path}.up.bias"),
                &self.up_bias,
                vec![self.up_bias.cols],
            ),
        ]
    }
}

/// Every adapter of a model: per decoder layer, the attention and the MLP adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct HoulsbyParams {
    /// The hyper-parameters.
    pub config: HoulsbyConfig,
    /// Per layer, per site in [`AdapterSite::ALL`] order.
    pub layers: Vec<[HoulsbyModule; 2]>,
}

impl HoulsbyParams {
    /// The near-identity initialisation of the module doc. `W_d` of site `s` in layer `i` is
    /// drawn row-major from `SplitMix64::for_stream(seed, 1_000_000 + 2·i + s)` (streams apart
    /// from LoRA's), each value `(2u − 1)/√H` with `u` the top 53 bits in `[0, 1)`.
    pub fn init(config: &HoulsbyConfig, model: &OptConfig, seed: u64) -> HoulsbyParams {
        let (h, m) = (model.hidden_size, config.bottleneck);
        let bound = 1.0 / (h as f64).sqrt();
        let layers = (0..model.num_hidden_layers)
            .map(|i| {
                AdapterSite::ALL.map(|site| {
                    let stream = 1_000_000 + (2 * i + site.index()) as u64;
                    let mut rng = SplitMix64::for_stream(seed, stream);
                    let down = (0..m * h)
                        .map(|_| {
                            let u = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                            ((2.0 * u - 1.0) * bound) as f32
                        })
                        .collect();
                    HoulsbyModule {
                        down: HostMatrix {
                            rows: m,
                            cols: h,
                            data: down,
                        },
                        down_bias: HostMatrix::zeros(1, m),
                        up: HostMatrix::zeros(h, m),
                        up_bias: HostMatrix::zeros(1, h),
                    }
                })
            })
            .collect();
        HoulsbyParams {
            config: config.clone(),
            layers,
        }
    }

    /// The adapter of `site` in `layer`, if the layer exists.
    pub fn get(&self, layer: usize, site: AdapterSite) -> Option<&HoulsbyModule> {
        self.layers.get(layer).map(|l| &l[site.index()])
    }

    /// Every tensor with its name, in canonical order (layer ascending, attention before MLP,
    /// then `down.weight`, `down.bias`, `up.weight`, `up.bias`).
    pub fn tensors(&self) -> Vec<(String, &HostMatrix)> {
        self.named().into_iter().map(|(n, m, _)| (n, m)).collect()
    }

    fn named(&self) -> Vec<(String, &HostMatrix, Vec<usize>)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                AdapterSite::ALL
                    .into_iter()
                    .flat_map(move |s| l[s.index()].named(&s.module_path(i)))
            })
            .collect()
    }

    /// [`tensors`](Self::tensors), mutably (same names, same order).
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut HostMatrix)> {
        let mut out = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (site, m) in AdapterSite::ALL.into_iter().zip(l.iter_mut()) {
                let p = site.module_path(i);
                out.push((format!("{p}.down.weight"), &mut m.down));
                out.push((format!("{p}.down.bias"), &mut m.down_bias));
                out.push((format!("{p}.up.weight"), &mut m.up));
                out.push((format!("{p}.up.bias"), &mut m.up_bias));
            }
        }
        out
    }
}

/// Writes `params` to `dir` in the layout of the module doc.
pub fn save_houlsby(
    dir: &Path,
    params: &HoulsbyParams,
    base_model_name_or_path: &str,
) -> Result<()> {
    let tensors = params.named();
    let mut config = Map::new();
    config.insert("peft_type".into(), Value::from(HOULSBY_TYPE));
    config.insert("bottleneck".into(), Value::from(params.config.bottleneck));
    config.insert(
        "activation".into(),
        Value::from(params.config.activation.name()),
    );
    config.insert("placement".into(), Value::from("houlsby"));
    config.insert(
        "base_model_name_or_path".into(),
        Value::from(base_model_name_or_path),
    );
    files::write_dir(
        dir,
        HOULSBY_WEIGHTS_FILE,
        &tensors,
        HOULSBY_CONFIG_FILE,
        config,
    )?;
    tracing::info!(dir = %dir.display(), tensors = tensors.len(), "Houlsby adapters saved");
    Ok(())
}

/// Reads the Houlsby adapters in `dir` for the model `model`: every tensor with the shape the
/// config's bottleneck and the model imply, and nothing else.
pub fn load_houlsby(dir: &Path, model: &OptConfig) -> Result<HoulsbyParams> {
    let (obj, st) = files::read_dir(dir, HOULSBY_WEIGHTS_FILE, HOULSBY_CONFIG_FILE, HOULSBY_TYPE)?;
    let file = dir.join(HOULSBY_CONFIG_FILE);
    let bad = |reason: String| PeftError::Config {
        file: file.clone(),
        reason,
    };
    let bottleneck = files::key(&obj, "bottleneck", &file)?
        .as_u64()
        .ok_or_else(|| bad("`bottleneck` is not a non-negative integer".into()))?
        as usize;
    let act = files::key(&obj, "activation", &file)?
        .as_str()
        .ok_or_else(|| bad("`activation` is not a string".into()))?;
    let activation = AdapterActivation::from_name(act)
        .ok_or_else(|| bad(format!("`activation` {act:?} is not `relu` or `gelu`")))?;
    match obj.get("placement").and_then(Value::as_str) {
        Some("houlsby") => {}
        other => {
            return Err(bad(format!(
                "`placement` is {other:?}, only \"houlsby\" is known"
            )))
        }
    }
    let config = HoulsbyConfig {
        bottleneck,
        activation,
    };
    config.validate()?;
    let mut params = HoulsbyParams::init(&config, model, 0);
    let names: Vec<String> = params.tensors().into_iter().map(|(n, _)| n).collect();
    files::no_extra(&st, &names)?;
    for (name, m) in params.tensors_mut() {
        let shape = if name.ends_with(".bias") {
            vec![m.cols]
        } else {
            vec![m.rows, m.cols]
        };
        *m = files::take(&st, &name, &shape, m.rows, m.cols)?;
    }
    tracing::info!(dir = %dir.display(), bottleneck, "Houlsby adapters loaded");
    Ok(params)
}
