//! Tensor maps for the TMA loops of sm_90a variants (COMPILER.md §8.2): the 128-byte
//! descriptors `cuTensorMapEncodeTiled` builds from a tensor's base, extents and row stride
//! and the box and swizzle the kernel's shared-memory tile expects. A variant lists what it
//! takes in [`Variant::tma`](lexp_compiler::launch::Variant::tma); [`encode`] reads the tensor
//! out of the launch's parameters, so generated launchers need not know about TMA.

use cudarc::driver::sys;
use cudarc::driver::DeviceRepr;
use lexp_compiler::launch::{KernelParam, TmaMap};

/// One encoded tensor map, passed by value as a kernel parameter (`.param .align 64 .b8
/// [128]`; the driver copies the 128 bytes at launch, so it may be dropped afterwards).
#[repr(transparent)]
#[derive(Clone, Copy, Debug)]
pub struct TensorMapParam(sys::CUtensorMap);

// SAFETY: a plain 128-byte value with no pointers into host memory; the PTX parameter has the
// same size.
unsafe impl DeviceRepr for TensorMapParam {}

/// Encodes `map` for the rank-2 tensor whose base pointer is `params[map.param]` (extents and
/// row stride following it, in elements). Errors name what does not suit the TMA.
pub fn encode(map: &TmaMap, params: &[KernelParam]) -> Result<TensorMapParam, String> {
    let get = |i: usize| params.get(map.param + i).copied();
    let (
        Some(KernelParam::Ptr(ptr)),
        Some(KernelParam::I64(d0)),
        Some(KernelParam::I64(d1)),
        Some(KernelParam::I64(s0)),
    ) = (get(0), get(1), get(2), get(3))
    else {
        return Err(format!(
            "tensor map over parameters {}..{}: expected a pointer, two extents and a stride",
            map.param,
            map.param + 4
        ));
    };
    let elem = map.elem as u64;
    let stride = (s0.max(0) as u64) * elem;
    if ptr % 16 != 0 || stride % 16 != 0 || stride >= 1 << 40 {
        return Err(format!(
            "tensor map: base {ptr:#x} and row stride {stride} bytes must be multiples of 16 (stride below 2^40)"
        ));
    }
    let dtype = match map.elem {
        1 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        2 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT16,
        4 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32,
        e => return Err(format!("tensor map: {e}-byte elements")),
    };
    let swizzle = match map.swizzle {
        128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        s => return Err(format!("tensor map: swizzle of {s} bytes")),
    };
    // Innermost first. An empty extent is encoded as 1: the kernel then issues no copy (its
    // loop or grid is empty), but the driver refuses 0.
    let dims: [u64; 2] = [(d1.max(1)) as u64, (d0.max(1)) as u64];
    let strides: [u64; 1] = [stride.max(16)];
    let boxes: [u32; 2] = [map.box_cols, map.box_rows];
    let unit: [u32; 2] = [1, 1];
    let mut out = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array of the length rank (2) or rank - 1
    // (strides) the call reads; `out` is a writable, suitably aligned CUtensorMap.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            out.as_mut_ptr(),
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            unit.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!(
            "cuTensorMapEncodeTiled failed ({r:?}) for extents {dims:?}, row stride {stride} bytes, box {boxes:?}, swizzle {}",
            map.swizzle
        ));
    }
    // SAFETY: the driver initialised the map on success.
    Ok(TensorMapParam(unsafe { out.assume_init() }))
}
