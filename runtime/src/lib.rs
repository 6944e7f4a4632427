//! lexp's runtime: runs compiled tile kernels on a GPU.
//!
//! This is the device layer: [`CudaDevice`] (context and the one stream all work is ordered
//! on), its [`ModuleCache`] of loaded PTX, the [`Launcher`](lexp_compiler::launch::Launcher)
//! implementation that generated kernel launchers call, [`DeviceTensor`] (device buffers with
//! f32 host I/O and NaN poisoning for tests), and event-based [`timing`]. [`cublas`] runs
//! cuBLAS baselines (row-major GEMM, PEFT-style LoRA) on the same context and stream.
//!
//! CUDA is reached through cudarc with dynamic loading: the crate builds and links without a
//! CUDA installation, and [`CudaDevice::new`] reports a missing driver or GPU as an error, so
//! callers can fall back to the CPU.

pub mod assembler;
pub mod autotune;
pub mod block_list;
pub mod buffer;
pub mod checkpoint;
pub mod cpu;
pub mod cublas;
pub mod cublaslt;
pub mod data;
pub mod device;
pub mod dist;
pub mod encode;
pub mod error;
pub mod exposure;
pub mod families;
pub mod gpu;
pub mod host_check;
pub mod host_matmul_check;
pub mod kernel_check;
mod launch;
pub mod matmul_check;
pub mod model;
pub mod module_cache;
pub mod optim;
pub mod peft;
pub mod profile;
pub mod sparse_ops;
pub mod step_bench;
pub mod tensor_map;
pub mod timing;
pub mod train;

pub use block_list::{BlockList, BlockListError};
pub use buffer::DeviceTensor;
pub use device::CudaDevice;
pub use encode::{decode, encode, poison_bits};
pub use error::{DeviceError, Result};
pub use module_cache::ModuleCache;
pub use timing::{copy_bandwidth, time_ms, Timing};

/// The cudarc version this crate is built against, for callers that need more of the driver
/// (cuBLAS, NCCL) on the same context and stream.
pub use cudarc;
