//! Every GPU kernel of lexp, written in the `#[kernel]` tile DSL (`lexp-macros`), and the
//! plain-Rust CPU references they are tested against ([`reference`](mod@reference)).
//!
//! Each kernel is a module (`lexp_kernels::softmax`) holding its compiled variants, a typed
//! launcher (`launch`) and an interpreter entry (`interpret`); [`ALL`] lists them.

pub mod attention_softmax;
pub mod bias;
pub mod block_select;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod flash_attention;
pub mod flash_fused;
pub mod flash_split;
pub mod gemm;
pub mod layernorm;
pub mod lora;
pub mod lora_branch;
pub mod optimizer;
pub mod reduce;
pub mod reference;
pub mod reference_matmul;
pub mod reference_select;
pub mod reference_sparse_mlp;
pub mod residual;
pub mod row_softmax;
pub mod sparse;
pub mod sparse_flash;
pub mod sparse_mlp;
pub mod xent;

pub use attention_softmax::{causal_softmax, softmax_bwd};
pub use bias::{bias_add, bias_relu};
pub use block_select::select_blocks;
pub use dropout::{dropout_mask, mul_inplace};
pub use elementwise::{axpby, convert, gelu, gelu_bwd, relu, relu_bwd};
pub use embedding::embedding_fwd;
pub use flash_attention::{flash_bwd_delta, flash_bwd_dkdv, flash_bwd_dq, flash_fwd};
pub use flash_fused::{flash_bwd_dq_store, flash_bwd_fused, flash_bwd_prep};
pub use flash_split::{flash_bwd_dkdv_split, flash_bwd_dq_split, flash_fwd_split};
pub use gemm::{gemm_nn, gemm_nt, gemm_tn};
pub use layernorm::{layernorm_bwd_dx, layernorm_bwd_params, layernorm_fwd};
pub use lora::{lora_bwd_dx, lora_fwd, lora_grad};
pub use lora_branch::{
    lora_down, lora_expand, lora_fold, lora_wgrad, lora_wgrad_pair, lora_wgrad_reduce,
    lora_wgrad_reduce_many, transpose_b,
};
pub use optimizer::{adamw, AdamwStep};
pub use reduce::{colsum, sum_squares, SUM_SQUARES_CHUNK};
pub use residual::bias_residual;
pub use row_softmax::softmax;
pub use sparse::{sparse_both, sparse_out, sparse_red};
pub use sparse_flash::{sparse_flash_dkdv, sparse_flash_dq, sparse_flash_fwd};
pub use sparse_mlp::{sparse_colsum, sparse_fc1_dx, sparse_fc1_fwd, sparse_fc2_dh, sparse_fc2_fwd};
pub use xent::xent_fwd_bwd;

use lexp_compiler::launch::KernelInfo;

/// Every kernel, in the order `lexp kernels` lists them.
pub static ALL: [&KernelInfo; 58] = [
    &axpby::INFO,
    &convert::INFO,
    &relu::INFO,
    &relu_bwd::INFO,
    &gelu::INFO,
    &gelu_bwd::INFO,
    &softmax::INFO,
    &layernorm_fwd::INFO,
    &layernorm_bwd_dx::INFO,
    &layernorm_bwd_params::INFO,
    &bias_residual::INFO,
    &colsum::INFO,
    &bias_add::INFO,
    &bias_relu::INFO,
    &embedding_fwd::INFO,
    &causal_softmax::INFO,
    &softmax_bwd::INFO,
    &xent_fwd_bwd::INFO,
    &adamw::INFO,
    &sum_squares::INFO,
    &dropout_mask::INFO,
    &mul_inplace::INFO,
    &gemm_nn::INFO,
    &gemm_nt::INFO,
    &gemm_tn::INFO,
    &sparse_out::INFO,
    &sparse_red::INFO,
    &sparse_both::INFO,
    &sparse_fc1_fwd::INFO,
    &sparse_fc2_fwd::INFO,
    &sparse_fc2_dh::INFO,
    &sparse_fc1_dx::INFO,
    &sparse_colsum::INFO,
    &select_blocks::INFO,
    &lora_fwd::INFO,
    &lora_bwd_dx::INFO,
    &lora_grad::INFO,
    &lora_down::INFO,
    &lora_expand::INFO,
    &transpose_b::INFO,
    &lora_fold::INFO,
    &lora_wgrad::INFO,
    &lora_wgrad_pair::INFO,
    &lora_wgrad_reduce::INFO,
    &lora_wgrad_reduce_many::INFO,
    &flash_fwd::INFO,
    &flash_bwd_delta::INFO,
    &flash_bwd_dkdv::INFO,
    &flash_bwd_dq::INFO,
    &flash_bwd_prep::INFO,
    &flash_bwd_fused::INFO,
    &flash_bwd_dq_store::INFO,
    &flash_fwd_split::INFO,
    &flash_bwd_dkdv_split::INFO,
    &flash_bwd_dq_split::INFO,
    &sparse_flash_fwd::INFO,
    &sparse_flash_dkdv::INFO,
    &sparse_flash_dq::INFO,
];

/// The kernels built on `dot` (tensor cores): compiled for 16-byte-aligned tensors only, and
/// checked by the tensor-core tests (their PTX and SASS hold tensor-core instructions).
pub const TENSOR_CORE: [&str; 26] = [
    "gemm_nn",
    "gemm_nt",
    "gemm_tn",
    "sparse_out",
    "sparse_red",
    "sparse_both",
    "sparse_fc1_fwd",
    "sparse_fc2_fwd",
    "sparse_fc2_dh",
    "sparse_fc1_dx",
    "lora_fwd",
    "lora_bwd_dx",
    "lora_grad",
    "lora_down",
    "lora_wgrad",
    "lora_wgrad_pair",
    "flash_fwd",
    "flash_bwd_dkdv",
    "flash_bwd_dq",
    "flash_bwd_fused",
    "flash_fwd_split",
    "flash_bwd_dkdv_split",
    "flash_bwd_dq_split",
    "sparse_flash_fwd",
    "sparse_flash_dkdv",
    "sparse_flash_dq",
];

/// Looks a kernel up by name.
pub fn find(name: &str) -> Option<&'static KernelInfo> {
    ALL.iter().copied().find(|k| k.name == name)
}
