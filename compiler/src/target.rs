//! Every fact about the GPU targets the compiler relies on, in one place.

use crate::launch::Arch;

/// A compilation target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Name for messages (`sm_90`).
    pub name: &'static str,
    /// The architecture enum the runtime selects by.
    pub arch: Arch,
    /// LLVM NVPTX CPU name.
    pub cpu: &'static str,
    /// LLVM target features (PTX ISA version).
    pub features: &'static str,
    /// Largest static shared memory per CTA (bytes); more needs the dynamic opt-in.
    pub max_static_smem: usize,
    /// Largest dynamic shared memory per CTA after the opt-in
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`).
    pub max_dynamic_smem: usize,
    /// Largest CTA size.
    pub max_threads: usize,
    /// Registers per thread ptxas may use at most.
    pub max_regs: usize,
}

/// LLVM target triple of every NVPTX module.
pub const TRIPLE: &str = "nvptx64-nvidia-cuda";
/// Threads per warp.
pub const WARP_SIZE: usize = 32;
/// Bytes one thread moves per vector access (`ld.global.v4.b32`).
pub const VECTOR_BYTES: usize = 16;
/// Address space of global memory in NVPTX.
pub const ADDRSPACE_GLOBAL: u16 = 1;
/// Address space of shared memory in NVPTX.
pub const ADDRSPACE_SHARED: u16 = 3;
/// The `ptx_kernel` calling convention id in LLVM.
pub const PTX_KERNEL_CC: u32 = 71;

/// Ampere (A100).
pub const SM80: Target = Target {
    name: "sm_80",
    arch: Arch::Sm80,
    cpu: "sm_80",
    features: "+ptx78",
    max_static_smem: 48 * 1024,
    max_dynamic_smem: 163 * 1024,
    max_threads: 1024,
    max_regs: 255,
};

/// Hopper (H100/H200). The arch-specific `sm_90a` features (`wgmma`, COMPILER.md §8) are
/// used, so this PTX runs on sm_90 devices only (which is what `Arch::Sm90` selects).
pub const SM90: Target = Target {
    name: "sm_90a",
    arch: Arch::Sm90,
    cpu: "sm_90a",
    features: "+ptx80",
    max_static_smem: 48 * 1024,
    max_dynamic_smem: 227 * 1024,
    max_threads: 1024,
    max_regs: 255,
};

/// Every target a kernel variant is compiled for.
pub const ALL: [Target; 2] = [SM80, SM90];
