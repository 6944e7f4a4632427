//! One Houlsby adapter on a sub-block output `h` (RUNTIME.md §2.7), forward and backward:
//!
//! ```text
//! r = h·W_dᵀ + b_d;  g = f(r);  out = h + g·W_uᵀ + b_u
//! dW_u = doutᵀ·g;  db_u = Σ_rows dout;  dr = (dout·W_u) ⊙ f'(r)
//! dW_d = drᵀ·h;    db_d = Σ_rows dr;    dh = dout + dr·W_d
//! ```

use crate::cpu::activation::{add_bias_inplace, column_sums, gelu_tanh, gelu_tanh_grad};
use crate::cpu::matmul::matmul;
use crate::peft::{AdapterActivation, HoulsbyModule};

/// What the forward keeps for the backward.
#[derive(Debug, Clone)]
pub struct HoulsbySaved {
    /// The adapter's input `h`, `[T, H]`.
    h: Vec<f32>,
    /// The pre-activation `r`, `[T, m]`.
    r: Vec<f32>,
}

/// Gradients of one adapter, laid out like [`HoulsbyModule`].
#[derive(Debug, Clone)]
pub struct HoulsbyGrads {
    /// `dW_d`, `[m, H]`.
    pub down: Vec<f32>,
    /// `db_d`, `[m]`.
    pub down_bias: Vec<f32>,
    /// `dW_u`, `[H, m]`.
    pub up: Vec<f32>,
    /// `db_u`, `[H]`.
    pub up_bias: Vec<f32>,
}

fn act(f: AdapterActivation, r: &[f32]) -> Vec<f32> {
    match f {
        AdapterActivation::Relu => r.iter().map(|&v| v.max(0.0)).collect(),
        AdapterActivation::Gelu => r.iter().map(|&v| gelu_tanh(v)).collect(),
    }
}

/// Replaces `h` (`[rows, H]`) by `h + adapter(h)` and returns what the backward needs.
pub fn forward(
    m: &HoulsbyModule,
    f: AdapterActivation,
    h: &mut [f32],
    rows: usize,
) -> HoulsbySaved {
    let (mid, hid) = (m.down.rows, m.down.cols);
    let mut r = vec![0.0; rows * mid];
    matmul(
        &mut r,
        h,
        &m.down.data,
        rows,
        hid,
        mid,
        false,
        true,
        1.0,
        0.0,
    );
    add_bias_inplace(&mut r, rows, mid, &m.down_bias.data);
    let g = act(f, &r);
    let input = h.to_vec();
    matmul(h, &g, &m.up.data, rows, mid, hid, false, true, 1.0, 1.0);
    add_bias_inplace(h, rows, hid, &m.up_bias.data);
    HoulsbySaved { h: input, r }
}

/// Backward for the output gradient `dout` (`[rows, H]`): returns the input gradient `dh`
/// and the adapter's parameter gradients.
pub fn backward(
    m: &HoulsbyModule,
    f: AdapterActivation,
    s: &HoulsbySaved,
    dout: &[f32],
    rows: usize,
) -> (Vec<f32>, HoulsbyGrads) {
    let (mid, hid) = (m.down.rows, m.down.cols);
    let g = act(f, &s.r);
    let mut up = vec![0.0; hid * mid];
    matmul(&mut up, dout, &g, hid, rows, mid, true, false, 1.0, 0.0);
    let up_bias = column_sums(dout, rows, hid);
    let mut dr = vec![0.0; rows * mid];
    matmul(
        &mut dr, dout, &m.up.data, rows, hid, mid, false, false, 1.0, 0.0,
    );
    match f {
        AdapterActivation::Relu => dr.iter_mut().zip(&s.r).for_each(|(d, &r)| {
            if r <= 0.0 {
                *d = 0.0
            }
        }),
        AdapterActivation::Gelu => dr
            .iter_mut()
            .zip(&s.r)
            .for_each(|(d, &r)| *d *= gelu_tanh_grad(r)),
    }
    let mut down = vec![0.0; mid * hid];
    matmul(&mut down, &dr, &s.h, mid, rows, hid, true, false, 1.0, 0.0);
    let down_bias = column_sums(&dr, rows, mid);
    let mut dh = dout.to_vec();
    matmul(
        &mut dh,
        &dr,
        &m.down.data,
        rows,
        mid,
        hid,
        false,
        false,
        1.0,
        1.0,
    );
    (
        dh,
        HoulsbyGrads {
            down,
            down_bias,
            up,
            up_bias,
        },
    )
}
