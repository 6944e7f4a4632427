//! Vectorisable `exp` and softmax row helpers for attention and the LM-head loss, where
//! `exp` over score rows is the main cost next to the GEMMs.
//!
//! [`exp`] is the Cephes `expf` (range reduction by `ln 2`, degree-6 polynomial, about 1 ulp)
//! written with plain arithmetic and bit operations only, so LLVM vectorises the loops that
//! call it (libm's `expf` is an opaque call per element). Row reductions keep 8 independent
//! lanes so they vectorise too, with the sums in f64.

/// Lanes of the row reductions.
const LANES: usize = 8;

/// Below this, `exp` underflows (to 0 here; f32's smallest normal is `exp(-87.34)`).
const EXP_LO: f32 = -87.336_54;
/// Above this, `exp` overflows f32; inputs are clamped (callers pass shifted scores ≤ 0).
const EXP_HI: f32 = 88.0;
/// `1.5·2²³`: adding it rounds an f32 of magnitude < 2²² to an integer held in the low bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `eˣ` in f32, within about 1 ulp of the exact value for `x` in `[-87.3, 88]`; 0 below, the
/// value at 88 above, NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    // The comparisons are false for NaN, so NaN flows through to the result.
    let xc = if x > EXP_HI { EXP_HI } else { x };
    let xc = if xc < EXP_LO { EXP_LO } else { xc };
    // n = round(x / ln 2), without `round` (a libm call on baseline x86-64).
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n_f = t - ROUND_MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    // r = x − n·ln 2, with ln 2 split in two for precision (Cephes C1 = 0.693359375, exact
    // in f32, and C2).
    let r = xc - n_f * 0.693_359_4 + n_f * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2ⁿ for n in [-126, 127]: a normal f32 with exponent field n + 127.
    let pow2 = f32::from_bits(((n + 127) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * pow2
    }
}

/// The maximum of `xs` (`-inf` if empty; NaN elements are skipped, as by `f32::max`).
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    lanes.iter().fold(tail, |a, &x| a.max(x))
}

/// `x ← exp(x − shift)` for every element; returns the sum of the new values, in f64.
pub(crate) fn exp_shift_sum(xs: &mut [f32], shift: f32) -> f64 {
    let mut lanes = [0.0f64; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c.iter_mut()) {
            *x = exp(*x - shift);
            *l += *x as f64;
        }
    }
    let mut tail = 0.0f64;
    for x in chunks.into_remainder() {
        *x = exp(*x - shift);
        tail += *x as f64;
    }
    lanes.iter().sum::<f64>() + tail
}

/// `x ← scale·exp(x − shift)` for every element.
pub(crate) fn exp_shift_scale(xs: &mut [f32], shift: f32, scale: f32) {
    for x in xs.iter_mut() {
        *x = scale * exp(*x - shift);
    }
}
