//! Errors of the device layer.
//!
//! Every error says what was being done when the driver refused, so that a failure in a long
//! run (a training step, a benchmark sweep) can be traced to its operation without a debugger.

use cudarc::driver::DriverError;
use lexp_compiler::launch::LaunchError;
use thiserror::Error;

/// Result of a device-layer operation.
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// Why a device operation failed.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The CUDA driver library (`libcuda.so`) could not be loaded: no NVIDIA driver is installed
    /// or it is not on the loader path. The CPU backend is the fallback.
    #[error("CUDA driver unavailable: {0}")]
    NoDriver(String),
    /// The driver loaded but there is no usable GPU (none present, or the ordinal is out of
    /// range).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// The driver refused an operation; `context` names the operation.
    #[error("CUDA driver error while {context}: {message}")]
    Driver {
        /// What was being done (`"allocating 4096 bytes"`, `"synchronizing the stream"`).
        context: String,
        /// The driver's error name and description.
        message: String,
    },
    /// A kernel's module could not be loaded or its entry could not be found.
    #[error("cannot load kernel `{symbol}`: {message}")]
    Load {
        /// The variant symbol (PTX entry name).
        symbol: String,
        /// The driver's error and, where the driver gave one, the PTX JIT log.
        message: String,
    },
    /// A host buffer, dims or an offset does not agree with a tensor's shape.
    #[error("shape error: {0}")]
    Shape(String),
    /// An argument outside its valid range (zero iterations, zero bytes, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A kernel launch was refused (by the launcher's checks or by the driver).
    #[error(transparent)]
    Launch(#[from] LaunchError),
}

impl DeviceError {
    /// Wraps a driver error with the operation it interrupted.
    pub fn driver(context: impl Into<String>, err: DriverError) -> DeviceError {
        DeviceError::Driver {
            context: context.into(),
            message: describe(&err),
        }
    }
}

/// `"CUDA_ERROR_OUT_OF_MEMORY (out of memory)"`: the error's name and the driver's description.
///
/// cudarc's own `Display` prints only the enum's debug form; the driver's string is what a user
/// can act on. Falls back to the debug form if the driver cannot describe the error.
pub fn describe(err: &DriverError) -> String {
    let name = format!("{:?}", err.0);
    match err.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

/// Shorthand for `map_err` on a driver call: `.map_err(failed("allocating"))`.
pub(crate) fn failed<S: Into<String>>(context: S) -> impl FnOnce(DriverError) -> DeviceError {
    move |e| DeviceError::driver(context, e)
}
