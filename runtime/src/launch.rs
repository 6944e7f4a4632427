//! Kernel launches: the [`Launcher`] implementation generated launchers call.

use crate::device::CudaDevice;
use crate::error::{describe, DeviceError};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use lexp_compiler::launch::{Arch, KernelParam, LaunchError, LaunchSpec, Launcher};
use tracing::trace;

/// Most threads a CTA may have on every supported architecture.
const MAX_THREADS: u32 = 1024;

impl Launcher for CudaDevice {
    /// The PTX target of this device. For a device without one (before sm_80) this returns
    /// `Sm80` so that launchers can still pick a variant; [`Launcher::launch`] then refuses.
    fn arch(&self) -> Arch {
        CudaDevice::arch(self).unwrap_or(Arch::Sm80)
    }

    /// Queues the variant on the device's stream (asynchronously: a fault in the kernel shows
    /// up at the next synchronisation).
    ///
    /// The block is `(variant.threads, 1, 1)`; the dynamic shared memory is the variant's
    /// `smem_bytes` when it is dynamic, else 0 (declared statically in its PTX). An empty grid (a dimension of 0, i.e.
    /// an empty tensor) launches nothing and succeeds.
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<(), LaunchError> {
        let variant = spec.variant;
        let kernel = variant.symbol;
        let driver = |message: String| LaunchError::Driver { kernel, message };
        if CudaDevice::arch(self).is_none() {
            let (major, minor) = self.compute_capability();
            return Err(driver(format!(
                "device {} (compute capability {major}.{minor}) has no PTX target",
                self.name()
            )));
        }
        if variant.threads == 0 || variant.threads > MAX_THREADS {
            return Err(driver(format!(
                "variant has {} threads per program (1..={MAX_THREADS} allowed)",
                variant.threads
            )));
        }
        if spec.grid.contains(&0) {
            trace!(kernel, grid = ?spec.grid, "empty grid: nothing to launch");
            return Ok(());
        }
        let func = self.modules().function(variant).map_err(|e| match e {
            // The symbol is already in the LaunchError's message.
            DeviceError::Load { message, .. } => driver(format!("cannot load module: {message}")),
            other => driver(other.to_string()),
        })?;
        let cfg = LaunchConfig {
            grid_dim: (spec.grid[0], spec.grid[1], spec.grid[2]),
            block_dim: (variant.threads, 1, 1),
            shared_mem_bytes: if variant.dynamic_smem {
                variant.smem_bytes
            } else {
                0
            },
        };
        // sm_90a variants with TMA loops take their tensor maps after the ordinary parameters.
        let maps = if CudaDevice::arch(self) == Some(Arch::Sm90) {
            variant
                .tma
                .iter()
                .map(|m| crate::tensor_map::encode(m, spec.params))
                .collect::<Result<Vec<_>, _>>()
                .map_err(driver)?
        } else {
            vec![]
        };
        let stream = self.stream();
        let mut builder = stream.launch_builder(&func);
        // The driver reads each parameter through a pointer at launch time; the values live in
        // `spec.params`, which outlives the launch below. Each is pushed with the width of its
        // PTX parameter (.u64, .s64, .s32, .f32).
        for p in spec.params {
            match p {
                KernelParam::Ptr(v) => builder.arg(v),
                KernelParam::I64(v) => builder.arg(v),
                KernelParam::I32(v) => builder.arg(v),
                KernelParam::F32(v) => builder.arg(v),
            };
        }
        for m in &maps {
            builder.arg(m);
        }
        trace!(kernel, grid = ?spec.grid, threads = variant.threads, params = spec.params.len(), "launch");
        // SAFETY: the parameters are in the order and of the types of the variant's PTX entry
        // (the generated launcher builds them from the same signature the PTX was compiled
        // from) and the launcher has checked the tensors' shapes and alignment.
        self.profiler()
            .span(
                stream,
                || kernel.to_string(),
                0.0,
                || {
                    // SAFETY: see above.
                    unsafe { builder.launch(cfg) }.map(|_| ())
                },
            )
            .map_err(|e| {
                driver(format!(
                    "launch with grid {:?} failed: {}",
                    spec.grid,
                    describe(&e)
                ))
            })
    }
}
