//! Element types of tiles and tensors.

use std::fmt;

/// The element type of a tile or of a tensor in memory.
///
/// `Ptr` is the pointer to global memory whose pointee is the given storage type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// Boolean (masks, comparison results).
    I1,
    /// 32-bit signed integer (indices, program ids).
    I32,
    /// 64-bit signed integer (sizes, strides, offsets).
    I64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// Pointer to global memory holding elements of the given (storage) type.
    Ptr(Storage),
}

/// The types a tensor in global memory may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Storage {
    F16,
    BF16,
    F32,
    I32,
}

impl Storage {
    /// The tile dtype of a loaded element.
    pub fn dtype(self) -> DType {
        match self {
            Storage::F16 => DType::F16,
            Storage::BF16 => DType::BF16,
            Storage::F32 => DType::F32,
            Storage::I32 => DType::I32,
        }
    }

    /// Size of one element in bytes.
    pub fn bytes(self) -> usize {
        match self {
            Storage::F16 | Storage::BF16 => 2,
            Storage::F32 | Storage::I32 => 4,
        }
    }

    /// The name used in IR text and in kernel variant names.
    pub fn name(self) -> &'static str {
        match self {
            Storage::F16 => "f16",
            Storage::BF16 => "bf16",
            Storage::F32 => "f32",
            Storage::I32 => "i32",
        }
    }

    /// Parses `f16`, `bf16`, `f32`, `i32`.
    pub fn from_name(s: &str) -> Option<Storage> {
        Some(match s {
            "f16" => Storage::F16,
            "bf16" => Storage::BF16,
            "f32" => Storage::F32,
            "i32" => Storage::I32,
            _ => return None,
        })
    }
}

impl DType {
    /// True for f16, bf16 and f32.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32)
    }

    /// True for i1, i32 and i64.
    pub fn is_int(self) -> bool {
        matches!(self, DType::I1 | DType::I32 | DType::I64)
    }

    /// The storage type of a float or i32 dtype, if it has one.
    pub fn storage(self) -> Option<Storage> {
        Some(match self {
            DType::F16 => Storage::F16,
            DType::BF16 => Storage::BF16,
            DType::F32 => Storage::F32,
            DType::I32 => Storage::I32,
            _ => return None,
        })
    }

    /// Size in bytes of one element in registers (i1 counts as 1, pointers as 8).
    pub fn bytes(self) -> usize {
        match self {
            DType::I1 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::Ptr(_) => 8,
        }
    }

    /// Parses the IR spelling (`f32`, `i1`, `ptr<bf16>`, ...).
    pub fn parse(s: &str) -> Option<DType> {
        if let Some(inner) = s.strip_prefix("ptr<").and_then(|r| r.strip_suffix('>')) {
            return Storage::from_name(inner).map(DType::Ptr);
        }
        Some(match s {
            "i1" => DType::I1,
            "i32" => DType::I32,
            "i64" => DType::I64,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            "f32" => DType::F32,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::I1 => f.write_str("i1"),
            DType::I32 => f.write_str("i32"),
            DType::I64 => f.write_str("i64"),
            DType::F16 => f.write_str("f16"),
            DType::BF16 => f.write_str("bf16"),
            DType::F32 => f.write_str("f32"),
            DType::Ptr(s) => write!(f, "ptr<{}>", s.name()),
        }
    }
}

/// Rounds an f32 to the nearest value representable in `dtype` (round to nearest even), the
/// way the GPU rounds on a store or a cast. Integers and f32 pass through.
pub fn round_to(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
