//! safetensors element types (RUNTIME.md §4.2) and the f32 conversions the runtime loads with.

use std::fmt;

/// A safetensors dtype, by its header name. Declared (and ordered) as in the reference
/// implementation, whose writer sorts by dtype. All of the format's types are known (so a file
/// of any of them parses), but only [`F32`](Dtype::F32), [`F16`](Dtype::F16) and
/// [`BF16`](Dtype::BF16) convert to and from f32 ([`Dtype::is_float_loadable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// `BOOL`, one byte per element.
    Bool,
    /// `F4`, 4 bits (sub-byte).
    F4,
    /// `F6_E2M3`, 6 bits (sub-byte).
    F6E2M3,
    /// `F6_E3M2`, 6 bits (sub-byte).
    F6E3M2,
    /// `U8`.
    U8,
    /// `I8`.
    I8,
    /// `F8_E5M2`.
    F8E5M2,
    /// `F8_E4M3`.
    F8E4M3,
    /// `F8_E8M0`.
    F8E8M0,
    /// `F8_E4M3FNUZ`.
    F8E4M3Fnuz,
    /// `F8_E5M2FNUZ`.
    F8E5M2Fnuz,
    /// `I16`.
    I16,
    /// `U16`.
    U16,
    /// `F16`, IEEE half precision.
    F16,
    /// `BF16`, bfloat16.
    BF16,
    /// `I32`.
    I32,
    /// `U32`.
    U32,
    /// `F32`.
    F32,
    /// `F64`.
    F64,
    /// `I64`.
    I64,
    /// `U64`.
    U64,
    /// `C64`, complex of two f32.
    C64,
}

impl Dtype {
    /// Every dtype, in declaration order.
    pub const ALL: [Dtype; 22] = [
        Dtype::Bool,
        Dtype::F4,
        Dtype::F6E2M3,
        Dtype::F6E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E5M2,
        Dtype::F8E4M3,
        Dtype::F8E8M0,
        Dtype::F8E4M3Fnuz,
        Dtype::F8E5M2Fnuz,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
        Dtype::C64,
    ];

    /// The name used in safetensors headers (`"F16"`, `"F8_E4M3"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6E2M3 => "F6_E2M3",
            Dtype::F6E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F8E4M3Fnuz => "F8_E4M3FNUZ",
            Dtype::F8E5M2Fnuz => "F8_E5M2FNUZ",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::C64 => "C64",
        }
    }

    /// The dtype with header name `name` (exact, case-sensitive, as the format requires).
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bits per element. Sub-byte types (4, 6) pack; a tensor's total bits must be a multiple
    /// of 8.
    pub fn bits(self) -> usize {
        match self {
            Dtype::F4 => 4,
            Dtype::F6E2M3 | Dtype::F6E3M2 => 6,
            Dtype::Bool
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8E5M2
            | Dtype::F8E4M3
            | Dtype::F8E8M0
            | Dtype::F8E4M3Fnuz
            | Dtype::F8E5M2Fnuz => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 64,
        }
    }

    /// Whether the runtime converts this dtype to and from f32 (F32, F16, BF16).
    pub fn is_float_loadable(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian `bytes` of `dtype` into f32; `None` for a dtype that is not
/// [loadable](Dtype::is_float_loadable) or a byte count that is not a whole number of elements.
/// Reads byte by byte, so no alignment is assumed (RUNTIME.md §4.3 rule 8).
pub(crate) fn decode_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 if bytes.len().is_multiple_of(4) => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 if bytes.len().is_multiple_of(2) => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 if bytes.len().is_multiple_of(2) => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
    }
}

/// Encodes `values` as little-endian `dtype` bytes (round to nearest even for F16/BF16), for
/// the writer; `None` if `dtype` is not [loadable](Dtype::is_float_loadable).
pub fn encode_f32(values: &[f32], dtype: Dtype) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len() * dtype.bits() / 8);
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
        assert_eq!(Dtype::from_name("f16"), None);
        assert_eq!(Dtype::from_name("F128"), None);
    }

    #[test]
    fn f32_conversions() {
        let v = [1.0f32, -2.5, 0.0, 65504.0];
        for d in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let bytes = encode_f32(&v, d).unwrap();
            assert_eq!(bytes.len(), v.len() * d.bits() / 8);
            let back = decode_f32(d, &bytes).unwrap();
            assert_eq!(&back[..3], &v[..3], "{d}");
        }
        // bf16 has 8 mantissa bits: 65504 rounds to 65536.
        assert_eq!(
            decode_f32(Dtype::BF16, &encode_f32(&[65504.0], Dtype::BF16).unwrap()).unwrap(),
            [65536.0]
        );
        assert_eq!(decode_f32(Dtype::F16, &[0x00, 0x3c]).unwrap(), [1.0]);
        assert_eq!(decode_f32(Dtype::BF16, &[0x80, 0x3f]).unwrap(), [1.0]);
        assert!(decode_f32(Dtype::I32, &[0; 4]).is_none());
        assert!(decode_f32(Dtype::F16, &[0; 3]).is_none());
    }
}
