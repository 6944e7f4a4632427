//! `lexp check --cpu` for the fine-tuning kernels (bias epilogues, embedding, causal softmax
//! and its backward, cross-entropy, AdamW): each run in the interpreter at one small shape
//! that crosses tile edges, against its CPU reference.

use super::{poisoned, t, Outputs};
use crate::kernel_check::Rng;
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference as refr;

/// The interpreter shape of one of this module's kernels (`None` for other kernels).
pub(super) fn dims(kernel: &str) -> Option<(usize, usize)> {
    Some(match kernel {
        "bias_add" | "bias_relu" => (33, 300),
        _ => return None,
    })
}

/// How a shape of this module's kernels prints (`None` for other kernels and plain shapes).
pub(super) fn shape_text(kernel: &str, dims: (usize, usize)) -> Option<String> {
    let _ = (kernel, dims);
    None
}

/// Runs one of this module's kernels in the interpreter; returns its outputs and references.
pub(super) fn run(
    kernel: &str,
    dtype: Storage,
    (r, c): (usize, usize),
    rng: &mut Rng,
) -> Result<Outputs, LaunchError> {
    let _ = poisoned;
    Ok(match kernel {
        "bias_add" | "bias_relu" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut bias = t(rng, dtype, &[c], -1.0, 1.0);
            let want = if kernel == "bias_relu" {
                refr::bias_relu(&x.data, r, c, &bias.data)
            } else {
                refr::bias_add(&x.data, r, c, &bias.data)
            };
            if kernel == "bias_relu" {
                let args = k::bias_relu::HostArgs {
                    x: &mut x,
                    bias: &mut bias,
                };
                k::bias_relu::interpret(&[], args)?;
            } else {
                let args = k::bias_add::HostArgs {
                    x: &mut x,
                    bias: &mut bias,
                };
                k::bias_add::interpret(&[], args)?;
            }
            vec![("x", x, want, 0.0)]
        }
        other => {
            return Err(LaunchError::NoVariant {
                kernel: "check",
                wanted: format!("unknown kernel `{other}`"),
            });
        }
    })
}
