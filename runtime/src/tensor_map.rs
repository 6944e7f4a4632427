//! Tensor maps for the TMA loops of sm_90a variants (COMPILER.md §8.2): the 128-byte
//! descriptors `cuTensorMapEncodeTiled` builds from a tensor's base, extents and strides and
//! the box and swizzle the kernel's shared-memory tile expects. A variant lists what it takes
//! in [`Variant::tma`](lexp_compiler::launch::Variant::tma); [`encode`] reads the tensor out of
//! the launch's parameters, so generated launchers need not know about TMA.

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

/// Encodes `map` for the tensor whose base pointer is `params[map.param]` (its extents, then
/// the strides of all but its last dimension following, in elements). Errors name what does
/// not suit the TMA.
pub fn encode(map: &TmaMap, params: &[KernelParam]) -> Result<TensorMapParam, String> {
    let rank = map.rank;
    if !(2..=3).contains(&rank) {
        return Err(format!("tensor map of rank {rank}"));
    }
    let bad = || {
        format!(
            "tensor map over parameters {}..: expected a pointer, {rank} extents and {} strides",
            map.param,
            rank - 1
        )
    };
    let int = |i: usize| match params.get(map.param + i) {
        Some(KernelParam::I64(v)) => Ok((*v).max(0) as u64),
        _ => Err(bad()),
    };
    let Some(KernelParam::Ptr(ptr)) = params.get(map.param).copied() else {
        return Err(bad());
    };
    if ptr % 16 != 0 {
        return Err(format!("tensor map: base {ptr:#x} is not 16-byte aligned"));
    }
    let elem = map.elem as u64;
    // Innermost first. An empty extent is encoded as 1: the kernel then issues no copy (its
    // loop or grid is empty), but the driver refuses 0.
    let mut dims = [1u64; 3];
    for d in 0..rank {
        dims[rank - 1 - d] = int(1 + d)?.max(1);
    }
    let mut strides = [16u64; 2];
    for d in 0..rank - 1 {
        let s = int(1 + rank + d)? * elem;
        if !s.is_multiple_of(16) || s >= 1 << 40 {
            return Err(format!(
                "tensor map: stride {s} bytes of dimension {d} must be a multiple of 16 below 2^40"
            ));
        }
        strides[rank - 2 - d] = s.max(16);
    }
    // The box: one index deep along a rank-3 tensor's middle dimension.
    let boxes: [u32; 3] = [
        map.box_cols,
        if rank == 3 { 1 } else { map.box_rows },
        map.box_rows,
    ];
    let unit = [1u32; 3];
    let dtype = match map.elem {
        4 if map.float32 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        e if map.float32 => return Err(format!("tensor map: f32 elements of {e} bytes")),
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
    let mut out = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: every pointer refers to a live local array at least as long as the rank (or
    // rank - 1, the strides) the call reads; `out` is a writable, suitably aligned CUtensorMap.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            out.as_mut_ptr(),
            dtype,
            rank as u32,
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
            "cuTensorMapEncodeTiled failed ({r:?}) for extents {:?}, strides {:?} bytes, box {:?}, swizzle {}",
            &dims[..rank],
            &strides[..rank - 1],
            &boxes[..rank],
            map.swizzle
        ));
    }
    // SAFETY: the driver initialised the map on success.
    Ok(TensorMapParam(unsafe { out.assume_init() }))
}
