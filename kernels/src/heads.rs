//! Head padding: flash attention at a head dimension its kernels are not compiled for (OPT-2.7B's
//! 80; tile extents are powers of two) runs the next compiled one on heads padded with zero
//! columns. Zero columns change nothing in exact arithmetic: they add nothing to `q·kᵀ`, and
//! the output and gradient columns they produce are zero and dropped.
//!
//! Both kernels take one row per program and walk its heads. The head dimension is a
//! compile-time constant `LO + HI` (tile sizes are powers of two, so it is given as two), so
//! that every access is a 16-byte vector: [`unpad_heads`] writes a head as two contiguous
//! pieces of `LO` and `HI` columns.

use lexp_macros::kernel;

/// The head dimensions the padding kernels are compiled for (`LO + HI`).
pub const PADDED_HEAD_DIMS: [usize; 1] = [80];

/// `(LO, HI)` of head dimension `hd` for the padding kernels: the largest power of two below
/// `hd` and the rest, when the rest is a power of two too.
pub fn split(hd: usize) -> Option<(usize, usize)> {
    if hd < 2 {
        return None;
    }
    let lo = 1usize << (usize::BITS - 1 - (hd - 1).leading_zeros());
    let hi = hd - lo;
    (hi > 0 && hi.is_power_of_two()).then_some((lo, hi))
}

/// `dst[r, g·DP + c] = src[r, g·hd + c]` for `c < hd = LO + HI`, `0` for `hd ≤ c < DP`: the
/// `hd`-wide heads of `src` spread to `DP` columns each.
#[kernel(
    variants(T = [bf16, f16], LO = [64], HI = [16], DP = [128]),
    warps = 1,
    grid = [dst.dim(0)],
    require = [
        dst.dim(0) == src.dim(0), src.dim(1) % (LO + HI) == 0,
        dst.dim(1) == src.dim(1) / (LO + HI) * DP
    ]
)]
pub fn pad_heads<T, const LO: usize, const HI: usize, const DP: usize>(
    src: Tensor<T, 2>,
    dst: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let c = range::<DP>();
    for g in 0..src.dim(1) / (LO + HI) {
        let x = src.load([row, g * (LO + HI) + c]).cast::<f32>();
        dst.store([row, g * DP + c], select(c < LO + HI, x, 0.0));
    }
}

/// The inverse of [`pad_heads`]: `dst[r, g·hd + c] = src[r, g·DP + c]` for `c < hd = LO + HI`,
/// in two contiguous pieces per head; the padding columns of `src` are not read.
#[kernel(
    variants(T = [bf16, f16], LO = [64], HI = [16], DP = [128]),
    warps = 1,
    grid = [dst.dim(0)],
    require = [
        dst.dim(0) == src.dim(0), dst.dim(1) % (LO + HI) == 0,
        src.dim(1) == dst.dim(1) / (LO + HI) * DP
    ]
)]
pub fn unpad_heads<T, const LO: usize, const HI: usize, const DP: usize>(
    src: Tensor<T, 2>,
    dst: TensorMut<T, 2>,
) {
    let row = program_id(0);
    let lo = range::<LO>();
    let hi = LO + range::<HI>();
    for g in 0..dst.dim(1) / (LO + HI) {
        dst.store([row, g * (LO + HI) + lo], src.load([row, g * DP + lo]));
        dst.store([row, g * (LO + HI) + hi], src.load([row, g * DP + hi]));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn split_into_two_powers_of_two() {
        assert_eq!(super::split(80), Some((64, 16)));
        assert_eq!(super::split(96), Some((64, 32)));
        assert_eq!(super::split(72), Some((64, 8)));
        assert_eq!(super::split(112), None, "48 is not a power of two");
        assert_eq!(
            super::split(64),
            Some((32, 32)),
            "strictly below: two halves"
        );
        assert_eq!(super::split(1), None);
        for hd in super::PADDED_HEAD_DIMS {
            assert!(super::split(hd).is_some(), "{hd}");
        }
    }
}
