//! Random OPT weights from a config alone: for benchmarks at sizes with no checkpoint at hand
//! (OPT-1.3B shapes) and for gradient tests of model variants the fixtures do not cover
//! (post-LN, `project_in/out`, no biases).

use super::config::OptConfig;
use super::weights::{LayerNorm, Linear, OptLayer, OptWeights};
use crate::checkpoint::host::HostMatrix;
use crate::data::SplitMix64;

/// Normal samples from a [`SplitMix64`] stream (Box–Muller).
struct Normal(SplitMix64);

impl Normal {
    fn next(&mut self) -> f32 {
        // Two uniforms in (0, 1]: 53 random bits each.
        let u = |r: &mut SplitMix64| ((r.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let (a, b) = (u(&mut self.0), u(&mut self.0));
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
    }

    fn vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.next()).collect()
    }

    fn matrix(&mut self, rows: usize, cols: usize, std: f32) -> HostMatrix {
        HostMatrix {
            rows,
            cols,
            data: self.vec(rows * cols, 0.0, std),
        }
    }
}

impl OptWeights {
    /// Weights for `config` drawn from `seed`: every matrix `N(0, std²)` (transformers' OPT
    /// init uses `std = 0.02`), biases `N(0, std²)`, LayerNorm `γ = 1 + N(0, 0.1²)` and
    /// `β = N(0, 0.1²)` (not exactly 1 and 0, so that tests exercise them). Deterministic per
    /// `(config, seed)`.
    pub fn random(config: &OptConfig, seed: u64, std: f32) -> OptWeights {
        let mut n = Normal(SplitMix64::new(seed));
        let (h, e, f) = (
            config.hidden_size,
            config.word_embed_proj_dim,
            config.ffn_dim,
        );
        let ln = |n: &mut Normal, present: bool| {
            present.then(|| LayerNorm {
                weight: n.vec(h, 1.0, 0.1),
                bias: n.vec(h, 0.0, 0.1),
            })
        };
        let lin = |n: &mut Normal, out_f: usize, in_f: usize| Linear {
            weight: n.matrix(out_f, in_f, std),
            bias: config.enable_bias.then(|| n.vec(out_f, 0.0, std)),
        };
        let affine = config.layer_norm_elementwise_affine;
        let embed_tokens = n.matrix(config.vocab_size, e, std);
        let embed_positions = n.matrix(config.position_rows(), h, std);
        let (project_in, project_out) = if config.has_projections() {
            (Some(n.matrix(h, e, std)), Some(n.matrix(e, h, std)))
        } else {
            (None, None)
        };
        let layers = (0..config.num_hidden_layers)
            .map(|_| OptLayer {
                self_attn_layer_norm: ln(&mut n, affine),
                q_proj: lin(&mut n, h, h),
                k_proj: lin(&mut n, h, h),
                v_proj: lin(&mut n, h, h),
                out_proj: lin(&mut n, h, h),
                final_layer_norm: ln(&mut n, affine),
                fc1: lin(&mut n, f, h),
                fc2: lin(&mut n, h, f),
            })
            .collect();
        let final_layer_norm = ln(&mut n, affine && config.has_final_layer_norm());
        let lm_head = (!config.tie_word_embeddings).then(|| n.matrix(config.vocab_size, e, std));
        OptWeights {
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            lm_head,
        }
    }
}
