//! What the GPT-2 and LLaMA-style loaders and forwards share: reading `config.json`, taking
//! tensors out of a [`Checkpoint`] with their shapes checked, validating a packed batch,
//! causal attention with grouped key/value heads, and the MLP activations.

use super::error::{FamilyError, Result};
use crate::checkpoint::opt::{Activation, LayerNorm, Linear};
use crate::checkpoint::{Checkpoint, CheckpointError, HostMatrix};
use crate::cpu::activation::{gelu_tanh, scale_inplace};
use crate::cpu::{attention_fwd, CpuError};
use crate::data::PackedBatch;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The most layers a config may declare (a larger count is a malformed file).
pub(crate) const MAX_LAYERS: usize = 1 << 12;

/// Reads `config.json` (`path` is the file, or a directory holding it): its path and text.
pub(crate) fn read_config(path: &Path) -> Result<(PathBuf, String), CheckpointError> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| CheckpointError::Io {
        file: file.clone(),
        op: "read",
        source,
    })?;
    Ok((file, text))
}

/// A config error naming `file`.
pub(crate) fn config_error(file: &Path, reason: String) -> CheckpointError {
    CheckpointError::Config {
        file: file.into(),
        reason,
    }
}

/// Checks that every `(field, value)` is positive and that the layer count is sane.
pub(crate) fn check_sizes(sizes: &[(&str, usize)], layers: usize) -> Result<(), String> {
    if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
        return Err(format!("{name} must be positive"));
    }
    if layers > MAX_LAYERS {
        return Err(format!(
            "{layers} layers is more than {MAX_LAYERS} (a malformed config?)"
        ));
    }
    Ok(())
}

/// Hands out a checkpoint's tensors by name, each checked for presence, shape and a
/// loadable dtype, and converted to f32; [`finish`](Self::finish) then rejects any tensor
/// nobody asked for (a typo must not silently drop a weight). Names are relative to the
/// prefix found by [`new`](Self::new), except in [`take`](Self::take).
pub(crate) struct Tensors<'a> {
    checkpoint: &'a Checkpoint,
    prefix: &'static str,
    taken: HashSet<String>,
}

impl<'a> Tensors<'a> {
    /// Picks the first of `prefixes` under which `checkpoint` holds `probe` (e.g. the token
    /// embedding); a missing tensor error naming `prefixes[0] + probe` if none does.
    pub(crate) fn new(
        checkpoint: &'a Checkpoint,
        prefixes: &[&'static str],
        probe: &str,
    ) -> Result<Self, CheckpointError> {
        let prefix = prefixes
            .iter()
            .copied()
            .find(|p| checkpoint.contains(&format!("{p}{probe}")))
            .ok_or_else(|| CheckpointError::MissingTensor {
                file: checkpoint.source().into(),
                tensor: format!("{}{probe}", prefixes.first().copied().unwrap_or("")),
            })?;
        Ok(Tensors {
            checkpoint,
            prefix,
            taken: HashSet::new(),
        })
    }

    /// The tensor `name` (full name, no prefix added) as f32, which must have `shape`.
    pub(crate) fn take(
        &mut self,
        name: &str,
        shape: &[usize],
    ) -> Result<Vec<f32>, CheckpointError> {
        let t = self
            .checkpoint
            .tensor(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                file: self.checkpoint.source().into(),
                tensor: name.into(),
            })?;
        if t.shape() != shape {
            return Err(CheckpointError::ShapeMismatch {
                file: t.file().into(),
                tensor: name.into(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        let values = t.to_f32()?;
        self.taken.insert(name.into());
        Ok(values)
    }

    /// Marks `name` (full name) as known but unused (a tied head's copy, a mask buffer).
    pub(crate) fn skip(&mut self, name: &str) {
        self.taken.insert(name.into());
    }

    /// The prefixed vector `name` of length `len`.
    pub(crate) fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, CheckpointError> {
        self.take(&format!("{}{name}", self.prefix), &[len])
    }

    /// The prefixed matrix `name` of shape `[rows, cols]`.
    pub(crate) fn matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<HostMatrix, CheckpointError> {
        let full = format!("{}{name}", self.prefix);
        self.full_matrix(&full, rows, cols)
    }

    /// The matrix `name` (full name) of shape `[rows, cols]`.
    pub(crate) fn full_matrix(
        &mut self,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<HostMatrix, CheckpointError> {
        let data = self.take(name, &[rows, cols])?;
        let found = vec![data.len()];
        HostMatrix::new(rows, cols, data).ok_or_else(|| CheckpointError::ShapeMismatch {
            file: self.checkpoint.source().into(),
            tensor: name.into(),
            expected: vec![rows, cols],
            found,
        })
    }

    /// The prefixed `nn.Linear` `name` (`.weight [out, in]`, `.bias [out]` if `bias`).
    pub(crate) fn linear(
        &mut self,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear, CheckpointError> {
        Ok(Linear {
            weight: self.matrix(&format!("{name}.weight"), out, inp)?,
            bias: if bias {
                Some(self.vector(&format!("{name}.bias"), out)?)
            } else {
                None
            },
        })
    }

    /// The prefixed LayerNorm `name` (`.weight`, `.bias`, each `[width]`).
    pub(crate) fn layer_norm(
        &mut self,
        name: &str,
        width: usize,
    ) -> Result<LayerNorm, CheckpointError> {
        Ok(LayerNorm {
            weight: self.vector(&format!("{name}.weight"), width)?,
            bias: self.vector(&format!("{name}.bias"), width)?,
        })
    }

    /// Fails on the first tensor (sorted by name) that was neither taken nor skipped and
    /// that `ignored` does not accept.
    pub(crate) fn finish(self, ignored: impl Fn(&str) -> bool) -> Result<(), CheckpointError> {
        let extra = self
            .checkpoint
            .names()
            .into_iter()
            .find(|n| !self.taken.contains(*n) && !ignored(n));
        match extra {
            None => Ok(()),
            Some(name) => Err(CheckpointError::UnexpectedTensor {
                file: self
                    .checkpoint
                    .tensor(name)
                    .map_or_else(|| self.checkpoint.source().into(), |t| t.file().into()),
                tensor: name.into(),
            }),
        }
    }
}

/// Checks `batch` before any op runs: at least one token, one position per token,
/// `cu_seqlens` = `[0, …, T]` non-decreasing, ids inside the vocabulary and, when the model
/// has a learned position table of `max_positions` rows, positions inside it. Returns `T`.
pub(crate) fn check_batch(
    batch: &PackedBatch,
    vocab: usize,
    max_positions: Option<usize>,
) -> Result<usize> {
    let t = batch.num_tokens();
    if t == 0 {
        return Err(FamilyError::Batch("the batch has no tokens".into()));
    }
    if batch.position_ids.len() != t {
        return Err(FamilyError::Batch(format!(
            "{t} tokens but {} positions",
            batch.position_ids.len()
        )));
    }
    let cu = &batch.cu_seqlens;
    match (cu.first(), cu.last()) {
        (Some(&0), Some(&last)) if last as i64 == t as i64 => {}
        _ => {
            return Err(FamilyError::Batch(format!(
                "cu_seqlens {:?} must start at 0 and end at the {t} tokens of the batch",
                &cu[..cu.len().min(8)]
            )))
        }
    }
    if let Some(i) = cu.windows(2).position(|w| w[1] < w[0]) {
        return Err(FamilyError::Batch(format!(
            "cu_seqlens decreases at index {}: {} then {}",
            i + 1,
            cu[i],
            cu[i + 1]
        )));
    }
    if let Some((position, &id)) = batch
        .input_ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= vocab)
    {
        return Err(FamilyError::TokenOutOfRange {
            position,
            id,
            vocab,
        });
    }
    if let Some(max) = max_positions {
        if let Some((position, &p)) = batch
            .position_ids
            .iter()
            .enumerate()
            .find(|(_, &p)| p as usize >= max)
        {
            return Err(FamilyError::PositionOutOfRange {
                position,
                pos: p as usize,
                max,
            });
        }
    }
    Ok(t)
}

/// HF's `repeat_kv`: `x [rows, kv_heads·hd]` widened to `[rows, kv_heads·n_rep·hd]`, head `h`
/// of the result being head `h / n_rep` of `x` (each key/value head serves `n_rep`
/// consecutive query heads). `n_rep == 1` returns a copy.
///
/// # Panics
/// If `x` is not `[rows, kv_heads·hd]`.
pub fn repeat_kv(x: &[f32], rows: usize, kv_heads: usize, n_rep: usize, hd: usize) -> Vec<f32> {
    assert_eq!(
        x.len(),
        rows * kv_heads * hd,
        "repeat_kv: x is not [{rows}, {kv_heads}·{hd}]"
    );
    let mut out = Vec::with_capacity(x.len() * n_rep);
    for row in x.chunks_exact(kv_heads * hd) {
        for head in row.chunks_exact(hd) {
            for _ in 0..n_rep {
                out.extend_from_slice(head);
            }
        }
    }
    out
}

/// Causal self-attention within each packed sequence: `q [T, heads·hd]` is multiplied by
/// `scale` in place (the score scale folded into q, equal up to rounding to scaling
/// `q·kᵀ`), `k`, `v` are `[T, kv_heads·hd]` and widened by [`repeat_kv`] when
/// `kv_heads < heads`. Returns `o [T, heads·hd]`.
///
/// # Errors
/// [`CpuError`] for a `cu_seqlens` or buffer that does not fit.
#[allow(clippy::too_many_arguments)]
pub(crate) fn causal_attention(
    q: &mut [f32],
    k: Vec<f32>,
    v: Vec<f32>,
    cu_seqlens: &[i32],
    heads: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
) -> Result<Vec<f32>, CpuError> {
    scale_inplace(q, scale);
    let (k, v) = if kv_heads == heads {
        (k, v)
    } else {
        let rows = k.len() / (kv_heads * hd).max(1);
        let n_rep = heads / kv_heads.max(1);
        (
            repeat_kv(&k, rows, kv_heads, n_rep, hd),
            repeat_kv(&v, rows, kv_heads, n_rep, hd),
        )
    };
    let (o, _) = attention_fwd(q, &k, &v, cu_seqlens, heads, hd)?;
    Ok(o)
}

/// `erf(x)` in f64 (std has none): the Maclaurin series below 3 in magnitude, where the
/// alternating terms lose under 1e-12 to cancellation, and the continued fraction of `erfc`
/// above, where it converges in a few dozen terms. Accurate to about 1e-13 absolute.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π · Σ (−1)ⁿ a^(2n+1) / (n!·(2n+1))
        let a2 = a * a;
        let (mut term, mut sum) = (a, a);
        for n in 1..200 {
            term *= -a2 / n as f64;
            let c = term / (2 * n + 1) as f64;
            sum += c;
            if c.abs() <= 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(a) = e^(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + …))))
        let mut f = a;
        for k in (1..=80).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() * std::f64::consts::FRAC_2_SQRT_PI / (2.0 * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// The exact GELU (`gelu`, PyTorch's default): `x·Φ(x) = 0.5·x·(1 + erf(x/√2))`, in f64
/// and rounded once.
pub fn gelu_erf(x: f32) -> f32 {
    let x = f64::from(x);
    (0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))) as f32
}

/// SiLU `x·σ(x) = x / (1 + e^(−x))`, in f64 and rounded once.
pub fn silu(x: f32) -> f32 {
    let x = f64::from(x);
    (x / (1.0 + (-x).exp())) as f32
}

/// Applies `act` element-wise in place.
pub(crate) fn activate_inplace(x: &mut [f32], act: Activation) {
    let f: fn(f32) -> f32 = match act {
        Activation::Relu => |v| if v < 0.0 { 0.0 } else { v },
        Activation::Gelu => gelu_erf,
        Activation::GeluNew => gelu_tanh,
        Activation::Silu => silu,
    };
    x.iter_mut().for_each(|v| *v = f(*v));
}
