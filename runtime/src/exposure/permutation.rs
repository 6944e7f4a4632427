//! The function-preserving neuron permutation of every layer's MLP (DESIGN.md §7, MLP step 2).
//!
//! Reordering a ReLU MLP's hidden neurons changes nothing it computes: with `perm` (new
//! position -> old neuron), `fc1`'s weight rows and bias entries and `fc2`'s weight columns are
//! gathered by `perm`, and so are the LoRA factors on the hidden side (`fc1`'s `B` rows, `fc2`'s
//! `A` columns). [`expose_model`] finds the permutation (co-activation Gram per layer from dense
//! forwards, then balanced clustering); it is kept beside a run ([`NeuronPermutation::save`]) so
//! that the adapters can be brought back to the original order before export
//! ([`NeuronPermutation::undo_lora`]).

use super::cluster::{self, ClusterError};
use super::coactivation::Coactivation;
use crate::checkpoint::{write_atomic, HostMatrix, OptModel, SafetensorsError};
use crate::data::PackedBatch;
use crate::model::{forward_exposed, Exposure, MlpHook, MlpMask, ModelError, PeftGrads};
use crate::peft::{LoraParams, LoraTarget};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The `format` field of a saved permutation.
pub const FORMAT: &str = "lexp-neuron-permutation/1";

/// Errors of permutations and of exposing a model.
#[derive(Debug, thiserror::Error)]
pub enum PermutationError {
    /// A layer's order is not a permutation of `0..ffn`.
    #[error("layer {layer}: neuron order is not a permutation of 0..{ffn}: {reason}")]
    NotAPermutation {
        /// The layer.
        layer: usize,
        /// Neurons of the layer.
        ffn: usize,
        /// What is wrong.
        reason: String,
    },
    /// The permutation has a different number of layers than the model or adapter.
    #[error("permutation has {have} layers, the {what} has {want}")]
    Layers {
        /// Layers in the permutation.
        have: usize,
        /// Layers expected.
        want: usize,
        /// Model or adapter.
        what: &'static str,
    },
    /// A saved permutation could not be read or parsed.
    #[error("cannot read neuron permutation {}: {reason}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Writing a permutation failed.
    #[error(transparent)]
    Write(#[from] SafetensorsError),
    /// The forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The clustering failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// Per decoder layer, the MLP's neuron order: `layers[l][new] = old`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeuronPermutation {
    /// Neurons per layer (`ffn_dim`).
    pub ffn: usize,
    /// Per layer, new position -> old neuron.
    pub layers: Vec<Vec<usize>>,
}

impl NeuronPermutation {
    /// The identity for `num_layers` layers of `ffn` neurons.
    pub fn identity(num_layers: usize, ffn: usize) -> NeuronPermutation {
        NeuronPermutation {
            ffn,
            layers: vec![(0..ffn).collect(); num_layers],
        }
    }

    /// Checks that every layer is a permutation of `0..ffn`, naming the first bad layer.
    pub fn validate(&self) -> Result<(), PermutationError> {
        let ffn = self.ffn;
        for (layer, p) in self.layers.iter().enumerate() {
            let bad = |reason: String| PermutationError::NotAPermutation { layer, ffn, reason };
            if p.len() != ffn {
                return Err(bad(format!("{} entries", p.len())));
            }
            let mut seen = vec![false; ffn];
            for &o in p {
                if o >= ffn {
                    return Err(bad(format!("entry {o} out of range")));
                }
                if std::mem::replace(&mut seen[o], true) {
                    return Err(bad(format!("neuron {o} appears twice")));
                }
            }
        }
        Ok(())
    }

    /// The inverse permutation (old neuron -> new position, i.e. the order that undoes this one).
    pub fn inverse(&self) -> NeuronPermutation {
        let layers = self
            .layers
            .iter()
            .map(|p| {
                let mut inv = vec![0; p.len()];
                for (new, &old) in p.iter().enumerate() {
                    inv[old] = new;
                }
                inv
            })
            .collect();
        NeuronPermutation {
            ffn: self.ffn,
            layers,
        }
    }

    /// Whether every layer is the identity.
    pub fn is_identity(&self) -> bool {
        self.layers
            .iter()
            .all(|p| p.iter().enumerate().all(|(i, &o)| i == o))
    }

    fn check_layers(
        &self,
        want: usize,
        ffn: usize,
        what: &'static str,
    ) -> Result<(), PermutationError> {
        self.validate()?;
        if self.layers.len() != want {
            return Err(PermutationError::Layers {
                have: self.layers.len(),
                want,
                what,
            });
        }
        if self.ffn != ffn {
            return Err(PermutationError::NotAPermutation {
                layer: 0,
                ffn: self.ffn,
                reason: format!("the {what} has ffn {ffn}"),
            });
        }
        Ok(())
    }

    /// Reorders the model's MLP neurons: `fc1` weight rows and bias, `fc2` weight columns.
    pub fn apply_to_model(&self, model: &mut OptModel) -> Result<(), PermutationError> {
        let c = &model.config;
        self.check_layers(c.num_hidden_layers, c.ffn_dim, "model")?;
        for (lw, p) in model.weights.layers.iter_mut().zip(&self.layers) {
            lw.fc1.weight = gather_rows(&lw.fc1.weight, p);
            if let Some(b) = &mut lw.fc1.bias {
                *b = p.iter().map(|&o| b[o]).collect();
            }
            lw.fc2.weight = gather_cols(&lw.fc2.weight, p);
        }
        Ok(())
    }

    /// Reorders the hidden side of the LoRA adapters on `fc1` (rows of `B`) and `fc2` (columns
    /// of `A`) to match a model permuted with [`apply_to_model`](Self::apply_to_model).
    pub fn apply_to_lora(&self, lora: &mut LoraParams) -> Result<(), PermutationError> {
        self.check_layers(lora.layers.len(), self.ffn, "adapter")?;
        for (modules, p) in lora.layers.iter_mut().zip(&self.layers) {
            for (target, m) in modules.iter_mut() {
                match target {
                    LoraTarget::Fc1 => m.b = gather_rows(&m.b, p),
                    LoraTarget::Fc2 => m.a = gather_cols(&m.a, p),
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Brings adapters trained on the permuted model back to the original neuron order (before
    /// export): [`apply_to_lora`](Self::apply_to_lora) with the inverse.
    pub fn undo_lora(&self, lora: &mut LoraParams) -> Result<(), PermutationError> {
        self.inverse().apply_to_lora(lora)
    }

    /// Brings LoRA gradients computed on the permuted model (with adapters permuted by
    /// [`apply_to_lora`](Self::apply_to_lora)) back to the original neuron order: the rows of
    /// fc1's `dB` and the columns of fc2's `dA`, the same reorder as [`undo_lora`](Self::undo_lora).
    pub fn undo_grads(&self, grads: &mut PeftGrads) -> Result<(), PermutationError> {
        self.check_layers(grads.layers.len(), self.ffn, "gradients")?;
        let inv = self.inverse();
        let ffn = self.ffn;
        for (layer, p) in grads.layers.iter_mut().zip(&inv.layers) {
            if let Some(g) = &mut layer.lora[LoraTarget::Fc1.index()] {
                let m = HostMatrix {
                    rows: ffn,
                    cols: g.b.len() / ffn.max(1),
                    data: std::mem::take(&mut g.b),
                };
                g.b = gather_rows(&m, p).data;
            }
            if let Some(g) = &mut layer.lora[LoraTarget::Fc2.index()] {
                let m = HostMatrix {
                    rows: g.a.len() / ffn.max(1),
                    cols: ffn,
                    data: std::mem::take(&mut g.a),
                };
                g.a = gather_cols(&m, p).data;
            }
        }
        Ok(())
    }

    /// Brings a permuted model back to the original neuron order.
    pub fn undo_model(&self, model: &mut OptModel) -> Result<(), PermutationError> {
        self.inverse().apply_to_model(model)
    }

    /// Writes the permutation as JSON (`{"format", "ffn", "layers"}`), atomically.
    pub fn save(&self, path: &Path) -> Result<(), PermutationError> {
        self.validate()?;
        let json = serde_json::json!({ "format": FORMAT, "ffn": self.ffn, "layers": self.layers });
        write_atomic(path, |w| {
            serde_json::to_writer(&mut *w, &json).map_err(std::io::Error::other)?;
            w.write_all(b"\n")
        })?;
        Ok(())
    }

    /// Reads a permutation written by [`save`](Self::save) and validates it.
    pub fn load(path: &Path) -> Result<NeuronPermutation, PermutationError> {
        let read = |reason: String| PermutationError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        #[derive(Deserialize)]
        struct File {
            format: String,
            ffn: usize,
            layers: Vec<Vec<usize>>,
        }
        let f: File = serde_json::from_str(&text).map_err(|e| read(e.to_string()))?;
        if f.format != FORMAT {
            return Err(read(format!("format `{}`, expected `{FORMAT}`", f.format)));
        }
        let p = NeuronPermutation {
            ffn: f.ffn,
            layers: f.layers,
        };
        p.validate()?;
        Ok(p)
    }
}

/// `out[r] = m[perm[r]]` for every row.
fn gather_rows(m: &HostMatrix, perm: &[usize]) -> HostMatrix {
    let data = perm
        .iter()
        .flat_map(|&o| m.row(o).iter().copied())
        .collect();
    HostMatrix {
        rows: m.rows,
        cols: m.cols,
        data,
    }
}

/// `out[:, c] = m[:, perm[c]]` for every column.
fn gather_cols(m: &HostMatrix, perm: &[usize]) -> HostMatrix {
    let data = (0..m.rows)
        .flat_map(|r| {
            let row = m.row(r);
            perm.iter().map(move |&o| row[o])
        })
        .collect();
    HostMatrix {
        rows: m.rows,
        cols: m.cols,
        data,
    }
}

/// An [`MlpHook`] that accumulates every layer's co-activation Gram matrix.
pub struct GramHook {
    grams: Vec<Mutex<Coactivation>>,
}

impl GramHook {
    /// Empty counts for `num_layers` layers of `ffn` neurons.
    pub fn new(num_layers: usize, ffn: usize) -> GramHook {
        GramHook {
            grams: (0..num_layers)
                .map(|_| Mutex::new(Coactivation::new(ffn)))
                .collect(),
        }
    }

    /// The accumulated counts, one per layer.
    pub fn into_grams(self) -> Vec<Coactivation> {
        self.grams
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }
}

impl MlpHook for GramHook {
    fn observe(&self, layer: usize, _: &[f32], act: &[f32], rows: usize, _: Option<&MlpMask>) {
        if let Some(g) = self.grams.get(layer) {
            let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = g.add(act, rows) {
                tracing::error!("layer {layer}: co-activation not recorded: {e}");
            }
        }
    }
}

/// Clusters every layer's neurons from its co-activation counts into blocks of `block`
/// (balanced k-means with `iters` iterations, layer `l` seeded `seed + l`).
pub fn cluster_grams(
    grams: &[Coactivation],
    block: usize,
    iters: usize,
    seed: u64,
) -> Result<NeuronPermutation, PermutationError> {
    let ffn = grams.first().map_or(0, |g| g.ffn());
    let mut layers = Vec::with_capacity(grams.len());
    for (l, g) in grams.iter().enumerate() {
        let assign = cluster::balanced_kmeans(
            &g.cosine(),
            g.ffn(),
            block,
            iters,
            seed.wrapping_add(l as u64),
        )?;
        layers.push(cluster::cluster_order(&assign));
    }
    let p = NeuronPermutation { ffn, layers };
    p.validate()?;
    Ok(p)
}

/// Exposes `model`: dense forwards over `batches` record every layer's co-activation, and a
/// balanced clustering into blocks of `block` neurons (seeded with `seed`) gives the neuron
/// order. Apply the result with [`NeuronPermutation::apply_to_model`].
pub fn expose_model(
    model: &OptModel,
    batches: &[PackedBatch],
    block: usize,
    seed: u64,
) -> Result<NeuronPermutation, PermutationError> {
    let c = &model.config;
    let hook = GramHook::new(c.num_hidden_layers, c.ffn_dim);
    for batch in batches {
        forward_exposed(model, None, batch, None, Exposure::of_mlp(&hook), false)?;
    }
    cluster_grams(&hook.into_grams(), block, cluster::DEFAULT_ITERS, seed)
}
