//! The CPU side of `lexp check`: every DSL kernel run in the compiler's interpreter (the same
//! IR the GPU runs, with the GPU's numerics) against the plain-Rust CPU reference, for machines
//! without a GPU. Shapes are small (the interpreter is slow) but cross tile edges.

use crate::kernel_check::{CheckRow, Rng, KERNELS};
use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference as refr;

mod train;

/// Interpreter outputs of one kernel run: name, result, reference, and the natural size of the
/// values for `reference::compare_scaled` (0: plain relative error).
type Outputs = Vec<(&'static str, HostTensor, Vec<f32>, f64)>;

fn t(rng: &mut Rng, dtype: Storage, dims: &[usize], lo: f32, hi: f32) -> HostTensor {
    let n = dims.iter().product();
    HostTensor::new(dtype, dims, &rng.uniform(n, lo, hi))
}

/// A poisoned output (NaN everywhere), so unwritten elements fail the comparison.
fn poisoned(dtype: Storage, dims: &[usize]) -> HostTensor {
    let n = dims.iter().product();
    HostTensor::new(dtype, dims, &vec![f32::NAN; n])
}

fn run(
    kernel: &str,
    dtype: Storage,
    (r, c): (usize, usize),
    rng: &mut Rng,
) -> Result<Outputs, LaunchError> {
    let f32s = Storage::F32;
    Ok(match kernel {
        "axpby" => {
            let mut x = t(rng, dtype, &[r], -3.0, 3.0);
            let mut y = t(rng, dtype, &[r], -3.0, 3.0);
            let want = refr::axpby(1.5, &x.data, -0.75, &y.data);
            k::axpby::interpret(
                &[],
                k::axpby::HostArgs {
                    a: 1.5,
                    x: &mut x,
                    b: -0.75,
                    y: &mut y,
                },
            )?;
            vec![("y", y, want, 0.0)]
        }
        "convert" => {
            let mut x = t(rng, Storage::F32, &[r], -3.0, 3.0);
            let mut y = poisoned(dtype, &[r]);
            let want = x.data.clone();
            k::convert::interpret(
                &[],
                k::convert::HostArgs {
                    x: &mut x,
                    y: &mut y,
                },
            )?;
            vec![("y", y, want, 0.0)]
        }
        "relu" | "gelu" => {
            let mut x = t(rng, dtype, &[r], -3.0, 3.0);
            let mut y = poisoned(dtype, &[r]);
            let want = if kernel == "gelu" {
                refr::gelu(&x.data)
            } else {
                refr::relu(&x.data)
            };
            if kernel == "gelu" {
                k::gelu::interpret(
                    &[],
                    k::gelu::HostArgs {
                        x: &mut x,
                        y: &mut y,
                    },
                )?;
            } else {
                k::relu::interpret(
                    &[],
                    k::relu::HostArgs {
                        x: &mut x,
                        y: &mut y,
                    },
                )?;
            }
            vec![("y", y, want, 0.0)]
        }
        "relu_bwd" | "gelu_bwd" => {
            let mut x = t(rng, dtype, &[r], -3.0, 3.0);
            let mut dy = t(rng, dtype, &[r], -3.0, 3.0);
            let mut dx = poisoned(dtype, &[r]);
            if kernel == "gelu_bwd" {
                let want = refr::gelu_bwd(&x.data, &dy.data);
                k::gelu_bwd::interpret(
                    &[],
                    k::gelu_bwd::HostArgs {
                        x: &mut x,
                        dy: &mut dy,
                        dx: &mut dx,
                    },
                )?;
                vec![("dx", dx, want, 0.0)]
            } else {
                let want = refr::relu_bwd(&x.data, &dy.data);
                k::relu_bwd::interpret(
                    &[],
                    k::relu_bwd::HostArgs {
                        y: &mut x,
                        dy: &mut dy,
                        dx: &mut dx,
                    },
                )?;
                vec![("dx", dx, want, 0.0)]
            }
        }
        "softmax" => {
            let mut x = t(rng, dtype, &[r, c], -8.0, 8.0);
            let mut y = poisoned(dtype, &[r, c]);
            let want = refr::softmax(&x.data, r, c);
            k::softmax::interpret(
                &[],
                k::softmax::HostArgs {
                    x: &mut x,
                    y: &mut y,
                },
            )?;
            vec![("y", y, want, 0.0)]
        }
        "layernorm_fwd" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut w = t(rng, dtype, &[c], 0.5, 1.5);
            let mut b = t(rng, dtype, &[c], -1.0, 1.0);
            let (wy, wm, ws) = refr::layernorm_fwd(&x.data, r, c, &w.data, &b.data, 1e-5);
            let (mut y, mut m, mut s) = (
                poisoned(dtype, &[r, c]),
                poisoned(f32s, &[r]),
                poisoned(f32s, &[r]),
            );
            let args = k::layernorm_fwd::HostArgs {
                x: &mut x,
                w: &mut w,
                b: &mut b,
                y: &mut y,
                mean: &mut m,
                rstd: &mut s,
                eps: 1e-5,
            };
            k::layernorm_fwd::interpret(&[], args)?;
            // The mean of random data cancels towards 0: judge it against each row's standard
            // deviation (1 / rstd), the scale that matters for `y`, as the GPU check does.
            let row_std = ws
                .iter()
                .map(|v| 1.0 / (*v as f64 * *v as f64))
                .sum::<f64>()
                .sqrt();
            vec![
                ("y", y, wy, 0.0),
                ("rstd", s, ws, 0.0),
                ("mean", m, wm, row_std),
            ]
        }
        "layernorm_bwd_dx" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut w = t(rng, dtype, &[c], 0.5, 1.5);
            let mut dy = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut m = t(rng, f32s, &[r], -0.5, 0.5);
            let mut s = t(rng, f32s, &[r], 0.5, 2.0);
            let want = refr::layernorm_bwd_dx(&x.data, r, c, &w.data, &dy.data, &m.data, &s.data);
            let mut dx = poisoned(dtype, &[r, c]);
            let args = k::layernorm_bwd_dx::HostArgs {
                x: &mut x,
                w: &mut w,
                dy: &mut dy,
                mean: &mut m,
                rstd: &mut s,
                beta: 0.0,
                dx: &mut dx,
            };
            k::layernorm_bwd_dx::interpret(&[], args)?;
            vec![("dx", dx, want, 0.0)]
        }
        "layernorm_bwd_params" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut dy = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut m = t(rng, f32s, &[r], -0.5, 0.5);
            let mut s = t(rng, f32s, &[r], 0.5, 2.0);
            let (ww, wb) = refr::layernorm_bwd_params(&x.data, r, c, &dy.data, &m.data, &s.data);
            let (mut dw, mut db) = (HostTensor::zeros(f32s, &[c]), HostTensor::zeros(f32s, &[c]));
            let args = k::layernorm_bwd_params::HostArgs {
                x: &mut x,
                dy: &mut dy,
                mean: &mut m,
                rstd: &mut s,
                dw: &mut dw,
                db: &mut db,
            };
            k::layernorm_bwd_params::interpret(&[], args)?;
            vec![("dw", dw, ww, 0.0), ("db", db, wb, 0.0)]
        }
        "bias_residual" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let mut bias = t(rng, dtype, &[c], -1.0, 1.0);
            let mut res = t(rng, dtype, &[r, c], -3.0, 3.0);
            let want = refr::bias_residual(&x.data, r, c, &bias.data, &res.data);
            let mut y = poisoned(dtype, &[r, c]);
            k::bias_residual::interpret(
                &[],
                k::bias_residual::HostArgs {
                    x: &mut x,
                    bias: &mut bias,
                    res: &mut res,
                    y: &mut y,
                },
            )?;
            vec![("y", y, want, 0.0)]
        }
        "colsum" => {
            let mut x = t(rng, dtype, &[r, c], -3.0, 3.0);
            let want = refr::colsum(&x.data, r, c);
            let mut out = HostTensor::zeros(f32s, &[c]);
            k::colsum::interpret(
                &[],
                k::colsum::HostArgs {
                    x: &mut x,
                    out: &mut out,
                },
            )?;
            vec![("out", out, want, 0.0)]
        }
        other => return train::run(other, dtype, (r, c), rng),
    })
}

/// Runs every kernel (or `only`) in the interpreter for each dtype and compares with the
/// reference. The interpreter rounds outputs to their storage type, as the GPU does.
pub fn check_all_host(only: Option<&str>) -> Result<Vec<CheckRow>, LaunchError> {
    let mut rows = vec![];
    for kernel in KERNELS {
        if only.map(|o| o != kernel).unwrap_or(false) {
            continue;
        }
        let dims = if let Some(d) = train::dims(kernel) {
            d
        } else if ["axpby", "convert", "relu", "relu_bwd", "gelu", "gelu_bwd"].contains(&kernel) {
            (5000, 0)
        } else {
            (9, 1100)
        };
        for dtype in crate::kernel_check::dtypes(kernel) {
            let mut rng = Rng::new(11);
            for (name, got, want, scale) in run(kernel, dtype, dims, &mut rng)? {
                let d = refr::compare_scaled(&got.data, &want, scale);
                let tol = refr::tolerance(got.dtype);
                rows.push(CheckRow {
                    kernel,
                    dtype: dtype.name(),
                    shape: if let Some(s) = train::shape_text(kernel, dims) {
                        s
                    } else if dims.1 == 0 {
                        format!("[{}]", dims.0)
                    } else {
                        format!("[{}, {}]", dims.0, dims.1)
                    },
                    variant: "interpreter".into(),
                    output: name,
                    rel_l2: d.rel_l2,
                    max_abs: d.max_abs,
                    tolerance: tol,
                    non_finite: d.non_finite,
                    pass: d.within(tol),
                });
            }
        }
    }
    Ok(rows)
}
