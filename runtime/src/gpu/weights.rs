//! The frozen OPT weights on the GPU, in bf16, and the check of what the GPU path runs.
//!
//! The q, k and v projections are fused into one `[3H, H]` weight (and one `[3H]` bias): one
//! GEMM instead of three in the forward, and one for their input gradient in the backward.
//! That weight is stored with [`QKV_ROOM`] spare rows and columns (zeros), where the LoRA fold
//! ([`super::lora_fold`]) writes the q/k/v adapters so that the same GEMM runs their branches.
//! Missing biases (`enable_bias = false`) and LayerNorms without affine parameters are
//! uploaded as zeros and ones, so that every layer runs the same launches.

use super::lora_fold::QKV_ROOM;
use super::ops::{dev_err, R};
use crate::buffer::DeviceTensor;
use crate::checkpoint::opt::{Activation, LayerNorm, Linear, OptLayer};
use crate::checkpoint::{HostMatrix, OptConfig, OptModel};
use crate::cublas::{Mat, MatLayout};
use crate::device::CudaDevice;
use crate::model::ModelError;
use lexp_compiler::dtype::Storage;

/// The storage type of weights and activations.
pub const ACT: Storage = Storage::BF16;

/// One decoder layer's weights on the device.
pub struct LayerWeights {
    /// `self_attn_layer_norm` weight and bias, `[H]`.
    pub ln1: (DeviceTensor, DeviceTensor),
    /// `q_proj`, `k_proj`, `v_proj` weights stacked, `[3H, H]`, inside a
    /// `[3H + QKV_ROOM, H + QKV_ROOM]` tensor (row stride [`qkv_ld`]; the room is the LoRA
    /// fold's, see [`LayerWeights::qkv`]).
    pub wqkv: DeviceTensor,
    /// Their biases, `[3H]`.
    pub bqkv: DeviceTensor,
    /// `out_proj` weight `[H, H]` and bias `[H]`.
    pub wo: DeviceTensor,
    /// See `wo`.
    pub bo: DeviceTensor,
    /// `final_layer_norm` (the MLP's LayerNorm) weight and bias, `[H]`.
    pub ln2: (DeviceTensor, DeviceTensor),
    /// `fc1` weight `[F, H]` and bias `[F]`.
    pub w1: DeviceTensor,
    /// See `w1`.
    pub b1: DeviceTensor,
    /// `fc2` weight `[H, F]` and bias `[H]`.
    pub w2: DeviceTensor,
    /// See `w2`.
    pub b2: DeviceTensor,
}

/// The row stride of the stored q/k/v weight for hidden size `h`.
pub fn qkv_ld(h: usize) -> usize {
    h + QKV_ROOM
}

impl LayerWeights {
    /// The first `cols` columns of the stored q/k/v weight's `[3H + QKV_ROOM, ·]`: `cols = H`
    /// is `Wqkv [3H, H]`; wider, the LoRA fold's columns follow.
    pub fn qkv(&self, h: usize, cols: usize) -> Mat<'_> {
        Mat::new(&self.wqkv, MatLayout::at(0, 3 * h, cols, qkv_ld(h)))
    }

    /// `rows` rows of the room below `Wqkv` (the LoRA fold's `A`s), columns `0..H`.
    pub fn qkv_room(&self, h: usize, rows: usize) -> Mat<'_> {
        let ld = qkv_ld(h);
        Mat::new(&self.wqkv, MatLayout::at(3 * h * ld, rows, h, ld))
    }
}

/// The whole frozen model on the device.
pub struct DeviceWeights {
    /// Token embedding `[V, H]` (also the LM head when tied).
    pub tok: DeviceTensor,
    /// Position embedding `[P + 2, H]`.
    pub pos: DeviceTensor,
    /// An untied LM head `[V, H]`, if the checkpoint has one.
    pub untied_head: Option<DeviceTensor>,
    /// The decoder's final LayerNorm, if it has one.
    pub final_ln: Option<(DeviceTensor, DeviceTensor)>,
    /// Per decoder layer.
    pub layers: Vec<LayerWeights>,
}

/// Refuses, with a message naming the feature, a model the GPU path does not implement.
pub fn check_supported(model: &OptModel) -> R<()> {
    let (c, w) = (&model.config, &model.weights);
    let unsupported = |what: String| {
        Err(ModelError::Unsupported(format!(
            "{what} on the GPU engine; use the CPU engine (--device cpu)"
        )))
    };
    if !c.do_layer_norm_before {
        return unsupported("post-LN layers (do_layer_norm_before = false, e.g. opt-350m)".into());
    }
    if c.word_embed_proj_dim != c.hidden_size || w.project_in.is_some() || w.project_out.is_some() {
        return unsupported(format!(
            "project_in/project_out (word_embed_proj_dim {} != hidden_size {})",
            c.word_embed_proj_dim, c.hidden_size
        ));
    }
    if c.activation != Activation::Relu {
        return unsupported(format!("activation {:?} (only ReLU)", c.activation));
    }
    if c.num_hidden_layers == 0 || w.layers.len() != c.num_hidden_layers {
        return unsupported(format!(
            "a model of {} decoder layers ({} loaded)",
            c.num_hidden_layers,
            w.layers.len()
        ));
    }
    if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
        return unsupported(format!(
            "hidden size {} not divisible into {} heads",
            c.hidden_size, c.num_attention_heads
        ));
    }
    Ok(())
}

/// Bytes the weights take on the device (for the out-of-memory message).
pub fn device_bytes(model: &OptModel) -> usize {
    let c = &model.config;
    let (h, f, v) = (c.hidden_size, c.ffn_dim, c.vocab_size);
    let layer =
        4 * h + ((3 * h + QKV_ROOM) * qkv_ld(h) + 3 * h) + (h * h + h) + (f * h + f) + (h * f + h);
    let head = if model.weights.lm_head.is_some() {
        v * h
    } else {
        0
    };
    ACT.bytes() * (v * h + (c.position_rows()) * h + head + 2 * h + c.num_hidden_layers * layer)
}

fn upload(dev: &CudaDevice, dims: &[usize], data: &[f32], what: &str) -> R<DeviceTensor> {
    DeviceTensor::from_f32(dev, ACT, dims, data).map_err(dev_err(format!("uploading {what}")))
}

fn matrix(dev: &CudaDevice, m: &HostMatrix, what: &str) -> R<DeviceTensor> {
    upload(dev, &[m.rows, m.cols], &m.data, what)
}

fn layer_norm(
    dev: &CudaDevice,
    ln: &Option<LayerNorm>,
    h: usize,
    what: &str,
) -> R<(DeviceTensor, DeviceTensor)> {
    match ln {
        Some(l) => Ok((
            upload(dev, &[h], &l.weight, what)?,
            upload(dev, &[h], &l.bias, what)?,
        )),
        None => Ok((
            upload(dev, &[h], &vec![1.0; h], what)?,
            upload(dev, &[h], &vec![0.0; h], what)?,
        )),
    }
}

fn bias(lin: &Linear) -> Vec<f32> {
    lin.bias
        .clone()
        .unwrap_or_else(|| vec![0.0; lin.weight.rows])
}

fn layer(dev: &CudaDevice, c: &OptConfig, i: usize, l: &OptLayer) -> R<LayerWeights> {
    let h = c.hidden_size;
    let name = |what: &str| format!("layer {i} {what}");
    let ld = qkv_ld(h);
    let mut wqkv = vec![0.0f32; (3 * h + QKV_ROOM) * ld];
    let mut bqkv = Vec::with_capacity(3 * h);
    for (i, lin) in [&l.q_proj, &l.k_proj, &l.v_proj].into_iter().enumerate() {
        for (r, row) in lin.weight.data.chunks(h).enumerate() {
            let at = (i * h + r) * ld;
            wqkv[at..at + h].copy_from_slice(row);
        }
        bqkv.extend(bias(lin));
    }
    Ok(LayerWeights {
        ln1: layer_norm(
            dev,
            &l.self_attn_layer_norm,
            h,
            &name("self_attn_layer_norm"),
        )?,
        wqkv: upload(dev, &[3 * h + QKV_ROOM, ld], &wqkv, &name("q/k/v_proj"))?,
        bqkv: upload(dev, &[3 * h], &bqkv, &name("q/k/v_proj bias"))?,
        wo: matrix(dev, &l.out_proj.weight, &name("out_proj"))?,
        bo: upload(dev, &[h], &bias(&l.out_proj), &name("out_proj bias"))?,
        ln2: layer_norm(dev, &l.final_layer_norm, h, &name("final_layer_norm"))?,
        w1: matrix(dev, &l.fc1.weight, &name("fc1"))?,
        b1: upload(dev, &[c.ffn_dim], &bias(&l.fc1), &name("fc1 bias"))?,
        w2: matrix(dev, &l.fc2.weight, &name("fc2"))?,
        b2: upload(dev, &[h], &bias(&l.fc2), &name("fc2 bias"))?,
    })
}

impl DeviceWeights {
    /// Uploads `model` (which [`check_supported`] accepted) in bf16.
    pub fn upload(dev: &CudaDevice, model: &OptModel) -> R<DeviceWeights> {
        let (c, w) = (&model.config, &model.weights);
        let final_ln = if c.has_final_layer_norm() {
            Some(layer_norm(
                dev,
                &w.final_layer_norm,
                c.hidden_size,
                "final layer norm",
            )?)
        } else {
            None
        };
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| layer(dev, c, i, l))
            .collect::<R<Vec<_>>>()?;
        Ok(DeviceWeights {
            tok: matrix(dev, &w.embed_tokens, "embed_tokens")?,
            pos: matrix(dev, &w.embed_positions, "embed_positions")?,
            untied_head: match &w.lm_head {
                Some(m) => Some(matrix(dev, m, "lm_head")?),
                None => None,
            },
            final_ln,
            layers,
        })
    }

    /// The LM head `[V, H]`: the untied head, else the token embedding.
    pub fn head(&self) -> &DeviceTensor {
        self.untied_head.as_ref().unwrap_or(&self.tok)
    }
}
