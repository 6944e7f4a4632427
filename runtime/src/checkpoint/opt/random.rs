//! Random OPT weights from a config alone: for benchmarks at sizes with no checkpoint at hand
//! (OPT-1.3B shapes) and for gradient tests of model variants the fixtures do not cover
//! (post-LN, `project_in/out`, no biases).

use super::config::OptConfig;
use super::weights::{LayerNorm, Linear, OptLayer, OptWeights};
use crate::checkpoint::host::HostMatrix;
use crate::data::SplitMix64;

/// Values per independently seeded chunk: tensors are filled in parallel, chunk by chunk,
/// each chunk from its own stream, so the result does not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// Draws `N(mean, std²)` tensors from `seed`, each from its own family of streams (numbered
/// in the order they are drawn).
struct Normal {
    seed: u64,
    tensor: u64,
}

impl Normal {
    fn vec(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        use rayon::prelude::*;
        let (seed, tensor) = (self.seed, self.tensor);
        self.tensor += 1;
        let mut out = vec![0.0f32; n];
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut rng = SplitMix64::for_stream(seed, tensor << 32 | c as u64);
                // Two uniforms in (0, 1] (53 random bits each), Box–Muller.
                let mut u = || ((rng.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
                for v in chunk {
                    let (a, b) = (u(), u());
                    let z = (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos();
                    *v = mean + std * z as f32;
                }
            });
        out
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
    /// `(config, seed)`, whatever the number of threads (OPT-1.3B's 1.3 G values take seconds).
    pub fn random(config: &OptConfig, seed: u64, std: f32) -> OptWeights {
        let mut n = Normal { seed, tensor: 0 };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_normal_and_shaped_like_the_config() {
        let json = r#"{"vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256,
                       "num_attention_heads": 4, "max_position_embeddings": 4000}"#;
        let c = OptConfig::from_json(json, std::path::Path::new("c.json")).unwrap();
        let a = OptWeights::random(&c, 1, 0.02);
        assert_eq!(a, OptWeights::random(&c, 1, 0.02));
        assert_ne!(
            a.layers[0].fc1.weight,
            OptWeights::random(&c, 2, 0.02).layers[0].fc1.weight
        );
        assert_eq!(a.num_parameters(), c.num_parameters());
        // The position table spans several chunks; its moments are N(0, 0.02²)'s.
        let p = &a.embed_positions.data;
        assert!(p.len() > 2 * CHUNK);
        let mean = p.iter().map(|&x| f64::from(x)).sum::<f64>() / p.len() as f64;
        let var = p
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / p.len() as f64;
        assert!(
            mean.abs() < 1e-4 && (var.sqrt() - 0.02).abs() < 2e-4,
            "mean {mean}, std {}",
            var.sqrt()
        );
        // Chunks are not copies of each other.
        assert_ne!(p[..16], p[CHUNK..CHUNK + 16]);
    }
}
