//! Loads each kernel variant's module once per device and keeps its function handle: the PTX,
//! JIT-compiled by the driver, or a cubin from [`crate::assembler`] when `$LEXP_PTXAS` names a
//! `ptxas`.

use crate::assembler::{self, Assembler};
use crate::error::{describe, DeviceError, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction};
use cudarc::nvrtc::Ptx;
use lexp_compiler::launch::{Arch, Variant};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};
use tracing::{debug, warn};

/// Loaded kernels of one device, keyed by [`Variant::symbol`].
///
/// The first launch of a variant loads its module; later launches only clone the cached
/// handle. The module is `variant.ptx(arch)` (entry `variant.symbol`), assembled into a cubin
/// for the device when an [`Assembler`] is set, else JIT-compiled by the driver.
pub struct ModuleCache {
    ctx: Arc<CudaContext>,
    arch: Option<Arch>,
    /// The assembler and its `-arch` for this device.
    assembler: Option<(Assembler, String)>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl ModuleCache {
    /// An empty cache for `ctx`, loading PTX for `arch` (`None`: every load is refused), with
    /// no assembler.
    pub fn new(ctx: Arc<CudaContext>, arch: Option<Arch>) -> ModuleCache {
        ModuleCache {
            ctx,
            arch,
            assembler: None,
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// Assembles every module with `assembler` for a device of compute capability
    /// `major.minor` from now on.
    pub fn with_assembler(mut self, assembler: Assembler, major: u32, minor: u32) -> ModuleCache {
        if let Some(arch) = self.arch {
            self.assembler = Some((assembler, assembler::target(arch, major, minor)));
        }
        self
    }

    /// The assembler's release line, when modules are assembled.
    pub fn assembler_version(&self) -> Option<&str> {
        self.assembler.as_ref().map(|(a, _)| a.version())
    }

    /// The function of `variant`, loading its module on first use.
    ///
    /// The lock is held while loading so that a variant is JIT-compiled only once even when
    /// several threads launch it at the same time.
    pub fn function(&self, variant: &'static Variant) -> Result<CudaFunction> {
        // The map is only ever changed by a single insert, so a poisoned lock still holds a
        // consistent map.
        let mut map = self.functions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(variant.symbol) {
            return Ok(f.clone());
        }
        let f = self.load(variant)?;
        map.insert(variant.symbol, f.clone());
        Ok(f)
    }

    /// Loads every variant of `variants` now (so the first timed launch does not pay the JIT).
    pub fn preload(&self, variants: impl IntoIterator<Item = &'static Variant>) -> Result<()> {
        for v in variants {
            self.function(v)?;
        }
        Ok(())
    }

    /// Number of loaded variants.
    pub fn len(&self) -> usize {
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// True when nothing is loaded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn load(&self, variant: &'static Variant) -> Result<CudaFunction> {
        let symbol = variant.symbol;
        let err = |message: String| DeviceError::Load {
            symbol: symbol.to_string(),
            message,
        };
        let arch = self.arch.ok_or_else(|| {
            err("the device has no PTX target (lexp needs compute capability 8.0 or newer)".into())
        })?;
        let ptx = variant.ptx(arch);
        if ptx.trim().is_empty() {
            return Err(err(format!("the variant has no PTX for {arch:?}")));
        }
        if ptx.contains('\0') {
            return Err(err("the PTX text contains a NUL byte".into()));
        }
        let image = self.assembler.as_ref().and_then(|(a, target)| {
            a.cubin(ptx, target)
                .map_err(|e| warn!(symbol, error = %e, "left to the driver's JIT"))
                .ok()
        });
        debug!(
            symbol,
            ?arch,
            bytes = ptx.len(),
            cubin = image.is_some(),
            "loading module"
        );
        let module = match image.map(|cubin| self.ctx.load_module(Ptx::from_binary(cubin))) {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => {
                // A cubin from a newer ptxas than the driver knows, say: the PTX still loads.
                warn!(symbol, error = %describe(&e), "cubin refused; left to the driver's JIT");
                self.ctx.load_module(Ptx::from_src(ptx))
            }
            None => self.ctx.load_module(Ptx::from_src(ptx)),
        };
        let module = match module {
            Ok(m) => m,
            Err(e) => {
                let mut message = format!("module load failed: {}", describe(&e));
                if let Some(log) = jit_error_log(&self.ctx, ptx) {
                    message.push_str("\nPTX JIT log:\n");
                    message.push_str(&log);
                }
                return Err(err(message));
            }
        };
        let f = module
            .load_function(symbol)
            .map_err(|e| err(format!("no entry `{symbol}` in its PTX: {}", describe(&e))))?;
        if variant.dynamic_smem {
            // Above 48 KB a function must opt into its dynamic shared memory.
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                variant.smem_bytes as i32,
            )
            .map_err(|e| {
                err(format!(
                    "cannot allow {} bytes of dynamic shared memory: {}",
                    variant.smem_bytes,
                    describe(&e)
                ))
            })?;
        }
        Ok(f)
    }
}

/// Loads `ptx` again with the driver's error log switched on and returns the log, for the
/// message of a failed load (cudarc's loader does not ask for it). `None` when the driver gives
/// no log or, unexpectedly, the load succeeds this time.
fn jit_error_log(ctx: &Arc<CudaContext>, ptx: &str) -> Option<String> {
    const LOG_BYTES: usize = 16 * 1024;
    let src = CString::new(ptx).ok()?;
    ctx.bind_to_thread().ok()?;
    let mut log = vec![0u8; LOG_BYTES];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // The driver takes option values as pointer-sized words: a buffer address and a size.
    let mut values = [log.as_mut_ptr() as *mut c_void, LOG_BYTES as *mut c_void];
    let mut module: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: `src` is NUL-terminated and outlives the call; `options` and `values` have the
    // length passed and the log buffer is LOG_BYTES long, as announced to the driver.
    let status = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            src.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if status == sys::CUresult::CUDA_SUCCESS {
        // SAFETY: `module` was just loaded by this call and is used nowhere else.
        let _ = unsafe { sys::cuModuleUnload(module) };
        return None;
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]).trim().to_string();
    (!text.is_empty()).then_some(text)
}
