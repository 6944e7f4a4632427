//! Host-side conversion between `f32` values and the raw bytes of a tensor in device memory.
//!
//! Kept as pure functions so that the rounding and byte layout can be tested without a GPU.
//! Device memory is little-endian, like every host lexp runs on.

use lexp_compiler::dtype::Storage;

/// The raw little-endian bytes of `values` stored as `dtype`.
///
/// f16 and bf16 round to nearest even (as the GPU does on a store), f32 is copied bit for bit
/// and i32 converts with `as` (truncating toward zero, saturating, NaN to 0).
pub fn encode(dtype: Storage, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.bytes());
    match dtype {
        Storage::BF16 => {
            for &x in values {
                out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        Storage::F16 => {
            for &x in values {
                out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
            }
        }
        Storage::F32 => {
            for &x in values {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        Storage::I32 => {
            for &x in values {
                out.extend_from_slice(&(x as i32).to_le_bytes());
            }
        }
    }
    out
}

/// The raw little-endian bytes of `values` as an i32 tensor.
pub fn encode_i32(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The values of the raw little-endian `bytes` of a `dtype` tensor, widened to f32 (exactly:
/// every f16, bf16 value is an f32; i32 beyond 2^24 rounds). A trailing partial element is
/// ignored.
pub fn decode(dtype: Storage, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Storage::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Storage::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        Storage::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Storage::I32 => decode_i32(bytes).into_iter().map(|v| v as f32).collect(),
    }
}

/// The values of the raw little-endian `bytes` of an i32 tensor. A trailing partial element is
/// ignored.
pub fn decode_i32(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The bit pattern [`crate::DeviceTensor::poison`] fills a `dtype` tensor with: a quiet NaN for
/// float types (`0x7FC0` bf16, `0x7E00` f16, `0x7FC0_0000` f32), so that any element a kernel
/// fails to write shows up as NaN. i32 uses `0x7FC0_0000` too (2143289344), an implausible
/// index or count.
pub fn poison_bits(dtype: Storage) -> u32 {
    match dtype {
        Storage::BF16 => 0x7FC0,
        Storage::F16 => 0x7E00,
        Storage::F32 | Storage::I32 => 0x7FC0_0000,
    }
}

/// `n` elements of poison for `dtype`, as raw bytes (what a poisoned buffer holds).
pub fn poison_bytes(dtype: Storage, n: usize) -> Vec<u8> {
    let bits = poison_bits(dtype);
    let one: Vec<u8> = match dtype.bytes() {
        2 => (bits as u16).to_le_bytes().to_vec(),
        _ => bits.to_le_bytes().to_vec(),
    };
    one.iter().copied().cycle().take(n * one.len()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Storage; 4] = [Storage::BF16, Storage::F16, Storage::F32, Storage::I32];

    #[test]
    fn poison_is_nan_for_floats() {
        for dtype in [Storage::BF16, Storage::F16, Storage::F32] {
            let v = decode(dtype, &poison_bytes(dtype, 3));
            assert_eq!(v.len(), 3);
            assert!(v.iter().all(|x| x.is_nan()), "{dtype:?}: {v:?}");
        }
        assert_eq!(poison_bytes(Storage::BF16, 2), [0xC0, 0x7F, 0xC0, 0x7F]);
        assert_eq!(poison_bytes(Storage::F16, 1), [0x00, 0x7E]);
        assert_eq!(poison_bytes(Storage::F32, 1), [0x00, 0x00, 0xC0, 0x7F]);
        assert_eq!(decode_i32(&poison_bytes(Storage::I32, 1)), [0x7FC0_0000]);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let ulp = 2f32.powi(-7); // bf16 spacing in [1, 2)
        let cases = [
            (1.0, 1.0),
            (1.0 + ulp / 2.0, 1.0),                   // tie, 1.0 is even: down
            (1.0 + 3.0 * ulp / 2.0, 1.0 + 2.0 * ulp), // tie, odd below: up
            (1.0 + ulp * 0.51, 1.0 + ulp),            // above the tie: up
            (-1.0 - ulp * 0.49, -1.0),
        ];
        for (x, want) in cases {
            assert_eq!(
                decode(Storage::BF16, &encode(Storage::BF16, &[x])),
                [want],
                "{x}"
            );
        }
        assert_eq!(
            encode(Storage::BF16, &[1.0, -2.0]),
            [0x80, 0x3F, 0x00, 0xC0]
        );
    }

    #[test]
    fn f16_rounds_and_overflows_like_the_gpu() {
        assert_eq!(encode(Storage::F16, &[1.0]), [0x00, 0x3C]);
        let ulp = 2f32.powi(-10);
        assert_eq!(
            decode(Storage::F16, &encode(Storage::F16, &[1.0 + ulp / 2.0])),
            [1.0]
        );
        assert_eq!(
            decode(Storage::F16, &encode(Storage::F16, &[1e6])),
            [f32::INFINITY]
        );
    }

    #[test]
    fn round_trips_are_exact_for_representable_values() {
        let values = [0.0, -0.0, 1.5, -3.25, 24576.0, 2f32.powi(-14), 100.0];
        for dtype in ALL {
            let bytes = encode(dtype, &values);
            assert_eq!(bytes.len(), values.len() * dtype.bytes());
            let back = decode(dtype, &bytes);
            for (x, y) in values.iter().zip(&back) {
                let want = match dtype {
                    Storage::I32 => x.trunc(),
                    _ => *x,
                };
                assert_eq!(*y, want, "{dtype:?}");
            }
        }
        // Bit-exact for f32, including NaN payloads and signed zero.
        let odd = f32::from_bits(0x7FA0_0001);
        let bytes = encode(Storage::F32, &[odd, -0.0]);
        assert_eq!(decode(Storage::F32, &bytes)[0].to_bits(), 0x7FA0_0001);
        assert_eq!(
            decode(Storage::F32, &bytes)[1].to_bits(),
            (-0.0f32).to_bits()
        );
    }

    #[test]
    fn i32_encoding_and_partial_tail() {
        assert_eq!(encode_i32(&[1, -1]), [1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(encode(Storage::I32, &[-2.7, 7.9]), encode_i32(&[-2, 7]));
        assert_eq!(decode(Storage::F32, &[0, 0, 0x80, 0x3F, 1, 2]), [1.0]);
    }
}
