//! A CUDA device: context, the one stream all work goes to, and the kernel module cache.

use crate::assembler::Assembler;
use crate::error::{failed, DeviceError, Result};
use crate::module_cache::ModuleCache;
use crate::profile::Profiler;
use cudarc::driver::{sys, CudaContext, CudaStream, DriverError};
use lexp_compiler::launch::Arch;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use tracing::{debug, info};

/// One GPU, driven through cudarc.
///
/// All work of a `CudaDevice` (copies, memsets, kernel launches, timing events) is ordered on
/// a single non-default stream, [`CudaDevice::stream`]. Kernels receive raw device addresses
/// (see [`crate::DeviceTensor::as_arg`]), which cudarc cannot track across streams, so one
/// stream is what keeps every operation correctly ordered; cudarc's per-buffer event tracking
/// is therefore switched off for this context (it would only add events to every copy). A
/// non-default stream also allows CUDA graph capture later, which the legacy default stream
/// does not.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    cc: (u32, u32),
    arch: Option<Arch>,
    /// Streaming multiprocessors.
    sms: usize,
    modules: ModuleCache,
    profiler: Arc<Profiler>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("compute_capability", &self.cc)
            .field("arch", &self.arch)
            .finish()
    }
}

/// Runs the first driver calls, turning a panic inside cudarc (it panics when `libcuda.so` or
/// one of its symbols cannot be loaded) into [`DeviceError::NoDriver`].
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let detail = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(DeviceError::NoDriver(format!(
                "libcuda.so could not be loaded while {what} ({detail})"
            )))
        }
    }
}

/// True when the driver says there is no device at all (rather than some other failure).
fn is_no_device(e: &DriverError) -> bool {
    e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE
}

/// Checks that `libcuda.so` can be loaded, without letting cudarc panic.
fn require_driver() -> Result<()> {
    // SAFETY: only tries `dlopen` on the candidate library names; nothing is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(DeviceError::NoDriver(
            "libcuda.so could not be loaded: no NVIDIA driver is installed or its library \
             directory is not on the loader path (LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

impl CudaDevice {
    /// Number of CUDA devices; `Ok(0)` when the driver loads but sees no GPU, `NoDriver` when
    /// the driver library cannot be loaded.
    pub fn count() -> Result<usize> {
        require_driver()?;
        guarded("counting devices", || match CudaContext::device_count() {
            Ok(n) => Ok(n.max(0) as usize),
            Err(e) if is_no_device(&e) => Ok(0),
            Err(e) => Err(DeviceError::driver("counting devices", e)),
        })
    }

    /// Opens device `ordinal`: retains its primary context and creates the device's stream.
    ///
    /// Fails with [`DeviceError::NoDriver`] when `libcuda.so` cannot be loaded and with
    /// [`DeviceError::NoDevice`] when there is no GPU or `ordinal` is out of range; it never
    /// panics for either. A GPU without a PTX target (compute capability below 8.0) opens, but
    /// its [`CudaDevice::arch`] is `None` and kernel launches are refused.
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        require_driver()?;
        let count = CudaDevice::count()?;
        if count == 0 {
            return Err(DeviceError::NoDevice(
                "the CUDA driver reports no GPU".into(),
            ));
        }
        if ordinal >= count {
            return Err(DeviceError::NoDevice(format!(
                "device ordinal {ordinal} out of range ({count} device(s))"
            )));
        }
        let context = format!("opening device {ordinal}");
        let ctx = guarded(&context, || {
            CudaContext::new(ordinal).map_err(|e| DeviceError::driver(context.clone(), e))
        })?;
        // SAFETY: every buffer of this context is used on the one stream created below (see
        // the type's documentation), so no cross-stream synchronisation is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(failed("creating the stream"))?;
        let name = ctx.name().map_err(failed("querying the device name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(failed("querying the compute capability"))?;
        let cc = (major.max(0) as u32, minor.max(0) as u32);
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(failed("querying the multiprocessor count"))?
            .max(1) as usize;
        let arch = Arch::for_compute_capability(cc.0, cc.1);
        info!(ordinal, %name, major = cc.0, minor = cc.1, ?arch, "opened CUDA device");
        if arch.is_none() {
            debug!(%name, "no PTX target for this compute capability; launches will be refused");
        }
        let mut modules = ModuleCache::new(ctx.clone(), arch);
        if let Some(a) = Assembler::from_env() {
            info!(
                version = a.version(),
                "kernel modules are assembled with ptxas"
            );
            modules = modules.with_assembler(a, cc.0, cc.1);
        }
        Ok(CudaDevice {
            ctx,
            stream,
            name,
            cc,
            arch,
            sms,
            modules,
            profiler: Arc::default(),
        })
    }

    /// The launch profiler of this device (off unless started; see [`crate::profile`]).
    pub fn profiler(&self) -> &Arc<Profiler> {
        &self.profiler
    }

    /// The device's name as the driver reports it (`"NVIDIA H200"`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device ordinal this was opened with.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Compute capability `(major, minor)`, e.g. `(9, 0)` for Hopper.
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// Streaming multiprocessors (132 on an H200): how many programs of a one-per-SM tile run
    /// at once.
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// The PTX target used for this device, `None` when lexp has none for it (before sm_80).
    ///
    /// Note: [`lexp_compiler::launch::Launcher::arch`] (implemented for this type) returns a
    /// plain `Arch`; method-call syntax picks this inherent method.
    pub fn arch(&self) -> Option<Arch> {
        self.arch
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(failed("querying memory"))
    }

    /// Waits for all work queued on the device's stream; reports errors of earlier
    /// asynchronous work (a faulting kernel shows up here).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(failed("synchronizing the stream"))?;
        self.ctx
            .check_err()
            .map_err(failed("checking deferred errors"))
    }

    /// The stream all of this device's work is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cudarc context (for cuBLAS handles and the like).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The cache of loaded kernel modules.
    pub fn modules(&self) -> &ModuleCache {
        &self.modules
    }

    /// How kernel modules become machine code on this device, for benchmark reports:
    /// `"cubin (ptxas <release>)"` or `"PTX (driver JIT)"`.
    pub fn module_code(&self) -> String {
        match self.modules.assembler_version() {
            Some(v) => format!("cubin (ptxas {v})"),
            None => "PTX (driver JIT)".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_a_device_never_panics() {
        // On a machine without libcuda (the development machine, CI) this must be a clean
        // NoDriver error; where there is a driver it may succeed or fail, but not panic.
        let driver_present = unsafe { sys::is_culib_present() };
        match CudaDevice::new(0) {
            Ok(dev) => assert!(driver_present, "opened {dev:?} without a driver?"),
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
                if !driver_present {
                    assert!(matches!(e, DeviceError::NoDriver(_)), "{e:?}");
                    assert!(msg.contains("libcuda.so"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn count_without_driver_is_an_error() {
        if unsafe { sys::is_culib_present() } {
            return;
        }
        assert!(matches!(CudaDevice::count(), Err(DeviceError::NoDriver(_))));
    }

    #[test]
    fn guarded_turns_panics_into_no_driver() {
        let r: Result<()> = guarded("testing", || panic!("Unable to dynamically load"));
        match r {
            Err(DeviceError::NoDriver(m)) => {
                assert!(m.contains("libcuda.so") && m.contains("Unable to dynamically load"))
            }
            other => panic!("{other:?}"),
        }
    }
}
