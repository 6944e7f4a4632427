//! The CPU backend: every op of a training step in plain Rust (rayon + the `gemm` crate), in
//! f32. It is the fallback that makes `lexp finetune` run on any machine, and the reference
//! every GPU op is tested against.
