//! Unit tests of the GPT-2 and LLaMA-style families that need no transformers reference:
//! config parsing and its errors ([`config`]), the loader and its errors ([`loader`]), and the
//! forwards against naive f64 re-implementations, packed-sequence isolation, RoPE and GQA
//! identities ([`forward`]). Helpers here build small random models, their tensor lists and
//! checkpoint directories.

mod config;
mod forward;
mod loader;

use super::*;
use crate::checkpoint::opt::{LayerNorm, Linear};
use crate::checkpoint::writer::{self, WriteTensor};
use crate::checkpoint::{Dtype, HostMatrix};
use crate::data::{PackedBatch, SplitMix64};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `base` (a JSON object) with the fields of `extra` (`"key": value, …`, no braces) added or
/// replaced.
fn merged(base: &str, extra: &str) -> String {
    let mut obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(base).unwrap();
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&format!("{{{extra}}}")).unwrap();
    obj.extend(extra);
    serde_json::Value::Object(obj).to_string()
}

/// A small GPT-2: H 16, 2 layers, 4 heads (hd 4), V 24, 12 positions; `extra` adds or
/// overrides fields (`"key": value, …`, no braces).
pub(super) fn gpt2_json(extra: &str) -> String {
    let base = r#"{"model_type": "gpt2", "vocab_size": 24, "n_positions": 12, "n_embd": 16,
                   "n_layer": 2, "n_head": 4}"#;
    merged(base, extra)
}

/// A small LLaMA: H 16, I 24, 2 layers, 4 heads, 2 KV heads (hd 4), V 24, RoPE θ 10000 in
/// v5's `rope_parameters`; `extra` as in [`gpt2_json`].
pub(super) fn llama_json(extra: &str) -> String {
    let base = r#"{"model_type": "llama", "vocab_size": 24, "hidden_size": 16,
                   "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 32,
                   "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}"#;
    merged(base, extra)
}

pub(super) fn gpt2_config(extra: &str) -> Gpt2Config {
    Gpt2Config::from_json(&gpt2_json(extra), Path::new("g/config.json")).unwrap()
}

pub(super) fn llama_config(extra: &str) -> LlamaConfig {
    LlamaConfig::from_json(&llama_json(extra), Path::new("l/config.json")).unwrap()
}

/// Uniform random values in `(-scale, scale)`.
pub(super) struct Rand(SplitMix64);

impl Rand {
    pub(super) fn new(seed: u64) -> Rand {
        Rand(SplitMix64::new(seed))
    }
    pub(super) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.0.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale)
            .collect()
    }
    /// `1 + vec(n, scale)`: a norm's weight.
    pub(super) fn ones(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.vec(n, scale).into_iter().map(|v| 1.0 + v).collect()
    }
    pub(super) fn mat(&mut self, rows: usize, cols: usize, scale: f32) -> HostMatrix {
        HostMatrix::new(rows, cols, self.vec(rows * cols, scale)).unwrap()
    }
    pub(super) fn linear(&mut self, out: usize, inp: usize, bias: bool) -> Linear {
        Linear {
            weight: self.mat(out, inp, 0.5),
            bias: bias.then(|| self.vec(out, 0.2)),
        }
    }
}

/// A GPT-2 with random weights (norm weights near 1, non-zero biases).
pub(super) fn random_gpt2(config: Gpt2Config, seed: u64) -> Gpt2Model {
    let mut r = Rand::new(seed);
    let (v, h, f) = (config.vocab_size, config.n_embd, config.n_inner);
    let ln = |r: &mut Rand| LayerNorm {
        weight: r.ones(h, 0.2),
        bias: r.vec(h, 0.2),
    };
    let conv = |r: &mut Rand, inp: usize, out: usize| Conv1d {
        weight: r.mat(inp, out, 0.5),
        bias: r.vec(out, 0.2),
    };
    let layers = (0..config.n_layer)
        .map(|_| Gpt2Layer {
            ln_1: ln(&mut r),
            c_attn: conv(&mut r, h, 3 * h),
            attn_proj: conv(&mut r, h, h),
            ln_2: ln(&mut r),
            c_fc: conv(&mut r, h, f),
            mlp_proj: conv(&mut r, f, h),
        })
        .collect();
    Gpt2Model {
        wte: r.mat(v, h, 1.0),
        wpe: r.mat(config.n_positions, h, 1.0),
        layers,
        ln_f: ln(&mut r),
        lm_head: (!config.tie_word_embeddings).then(|| r.mat(v, h, 1.0)),
        config,
    }
}

/// A LLaMA-style model with random weights.
pub(super) fn random_llama(config: LlamaConfig, seed: u64) -> LlamaModel {
    let mut r = Rand::new(seed);
    let c = &config;
    let (v, h, i) = (c.vocab_size, c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let (ab, mb) = (c.attention_bias, c.mlp_bias);
    let layers = (0..c.num_hidden_layers)
        .map(|_| LlamaLayer {
            input_layernorm: r.ones(h, 0.2),
            q_proj: r.linear(q, h, ab),
            k_proj: r.linear(kv, h, ab),
            v_proj: r.linear(kv, h, ab),
            o_proj: r.linear(h, q, ab),
            post_attention_layernorm: r.ones(h, 0.2),
            gate_proj: r.linear(i, h, mb),
            up_proj: r.linear(i, h, mb),
            down_proj: r.linear(h, i, mb),
        })
        .collect();
    LlamaModel {
        embed_tokens: r.mat(v, h, 1.0),
        layers,
        norm: r.ones(h, 0.2),
        lm_head: (!c.tie_word_embeddings).then(|| r.mat(v, h, 1.0)),
        config,
    }
}

/// A named tensor to write: name, shape, values.
pub(super) type Named = (String, Vec<usize>, Vec<f32>);

fn mat(name: String, m: &HostMatrix) -> Named {
    (name, vec![m.rows, m.cols], m.data.clone())
}

fn vector(name: String, v: &[f32]) -> Named {
    (name, vec![v.len()], v.to_vec())
}

/// The checkpoint tensors of `m` as `GPT2LMHeadModel` names them, with `prefix` before the
/// transformer's names (`"transformer."` or `""`).
pub(super) fn gpt2_tensors(m: &Gpt2Model, prefix: &str) -> Vec<Named> {
    let mut out = vec![
        mat(format!("{prefix}wte.weight"), &m.wte),
        mat(format!("{prefix}wpe.weight"), &m.wpe),
    ];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("{prefix}h.{i}.");
        for (name, ln) in [("ln_1", &l.ln_1), ("ln_2", &l.ln_2)] {
            out.push(vector(format!("{p}{name}.weight"), &ln.weight));
            out.push(vector(format!("{p}{name}.bias"), &ln.bias));
        }
        for (name, c) in [
            ("attn.c_attn", &l.c_attn),
            ("attn.c_proj", &l.attn_proj),
            ("mlp.c_fc", &l.c_fc),
            ("mlp.c_proj", &l.mlp_proj),
        ] {
            out.push(mat(format!("{p}{name}.weight"), &c.weight));
            out.push(vector(format!("{p}{name}.bias"), &c.bias));
        }
    }
    out.push(vector(format!("{prefix}ln_f.weight"), &m.ln_f.weight));
    out.push(vector(format!("{prefix}ln_f.bias"), &m.ln_f.bias));
    if let Some(head) = &m.lm_head {
        out.push(mat("lm_head.weight".into(), head));
    }
    out
}

/// The checkpoint tensors of `m` as `LlamaForCausalLM` names them.
pub(super) fn llama_tensors(m: &LlamaModel) -> Vec<Named> {
    let mut out = vec![mat("model.embed_tokens.weight".into(), &m.embed_tokens)];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}.");
        out.push(vector(
            format!("{p}input_layernorm.weight"),
            &l.input_layernorm,
        ));
        out.push(vector(
            format!("{p}post_attention_layernorm.weight"),
            &l.post_attention_layernorm,
        ));
        for (name, lin) in [
            ("self_attn.q_proj", &l.q_proj),
            ("self_attn.k_proj", &l.k_proj),
            ("self_attn.v_proj", &l.v_proj),
            ("self_attn.o_proj", &l.o_proj),
            ("mlp.gate_proj", &l.gate_proj),
            ("mlp.up_proj", &l.up_proj),
            ("mlp.down_proj", &l.down_proj),
        ] {
            out.push(mat(format!("{p}{name}.weight"), &lin.weight));
            if let Some(b) = &lin.bias {
                out.push(vector(format!("{p}{name}.bias"), b));
            }
        }
    }
    out.push(vector("model.norm.weight".into(), &m.norm));
    if let Some(head) = &m.lm_head {
        out.push(mat("lm_head.weight".into(), head));
    }
    out
}

/// A fresh directory for one test, removed when dropped.
pub(super) struct Scratch(pub(super) PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `config.json` and `model.safetensors` (F32) into a fresh scratch directory.
pub(super) fn write_dir(name: &str, config_json: &str, tensors: &[Named]) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lexp-families-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config_json).unwrap();
    let write: Vec<WriteTensor> = tensors
        .iter()
        .map(|(n, s, v)| WriteTensor::from_f32(n.clone(), s.clone(), v, Dtype::F32).unwrap())
        .collect();
    writer::write(dir.join("model.safetensors"), &write, &BTreeMap::new()).unwrap();
    Scratch(dir)
}

/// A packed batch of `seqs`, positions restarting at 0 per sequence.
pub(super) fn packed(seqs: &[Vec<u32>]) -> PackedBatch {
    let mut b = PackedBatch {
        cu_seqlens: vec![0],
        ..Default::default()
    };
    for (i, s) in seqs.iter().enumerate() {
        b.input_ids.extend(s);
        b.position_ids.extend(0..s.len() as u32);
        b.targets.extend(std::iter::repeat_n(-100, s.len()));
        b.cu_seqlens.push(b.input_ids.len() as i32);
        b.examples.push(i);
    }
    b
}

/// Three sequences of uneven lengths over a vocabulary of 24.
pub(super) fn three_sequences() -> Vec<Vec<u32>> {
    vec![
        vec![3, 17, 5, 5, 22, 0, 9],
        vec![11, 2, 23, 8, 14, 6, 1, 19, 4, 12, 7],
        vec![20, 13, 16],
    ]
}

/// The largest absolute difference between two equally long slices.
pub(super) fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
