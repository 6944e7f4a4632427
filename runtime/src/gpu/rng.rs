//! Dropout's random numbers on the GPU: a cuRAND Philox generator on the device's stream,
//! filling f32 uniforms into a workspace buffer for the `dropout_mask` kernel.
//!
//! Every mask is drawn from its own stream: the generator is re-seeded (offset 0) with a mix
//! of the forward pass's [`DropoutRng`](crate::model::DropoutRng) seed, the layer and the
//! [`Site`], so a mask depends on `(seed, layer, site)` only, not on the order of the draws:
//! a resumed run draws the same masks as an uninterrupted one on the same engine.
//!
//! libcurand is loaded at run time like libcublas; when it cannot be loaded,
//! [`GpuRng::new`] fails with a [`ModelError::Device`] naming the library (only runs with
//! dropout need it).

use super::ops::{dev_err, R};
use crate::buffer::DeviceTensor;
use crate::data::SplitMix64;
use crate::device::CudaDevice;
use crate::model::dropout::Site;
use crate::model::ModelError;
use cudarc::curand::result::{self as cr, generate};
use cudarc::curand::sys as cs;
use lexp_compiler::dtype::Storage;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A cuRAND Philox4x32-10 generator bound to one device's stream.
pub struct GpuRng {
    gen: cs::curandGenerator_t,
}

// SAFETY: the generator handle is only used through `&self`/`&mut self` of its owner, one
// call at a time; cuRAND generators may be used from any thread bound to their context.
unsafe impl Send for GpuRng {}

/// The seed of one mask's stream: `(seed, layer, site)` mixed by SplitMix64.
pub fn site_seed(seed: u64, layer: usize, site: Site) -> u64 {
    SplitMix64::for_stream(seed, (layer as u64) << 8 | site.code()).next_u64()
}

/// The message for a missing libcurand: the names searched and how to make it visible.
fn missing_curand() -> String {
    let mut names = cudarc::get_lib_name_candidates("curand");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    format!(
        "dropout on the GPU needs cuRAND, but libcurand could not be loaded (searched the \
         loader path for {}); add the directory holding libcurand.so (a CUDA toolkit's lib64, \
         or PyTorch's pip wheel nvidia-curand-cu12: site-packages/nvidia/curand/lib) to \
         LD_LIBRARY_PATH before starting the program, or train with dropout 0 \
         (--model-dropout 0 and LoRA dropout 0) or on the CPU",
        names.join(", ")
    )
}

/// Checks that libcurand can be loaded (what a GPU run with dropout needs), without a device:
/// [`ModelError::Device`] naming the library and how to make it visible otherwise.
pub fn curand_available() -> R {
    // SAFETY: only tries to open the library.
    if unsafe { cs::is_culib_present() } {
        Ok(())
    } else {
        Err(ModelError::Device(missing_curand()))
    }
}

impl GpuRng {
    /// Creates a Philox generator on `dev`'s stream; [`ModelError::Device`] naming libcurand
    /// when the library cannot be loaded.
    pub fn new(dev: &CudaDevice) -> R<GpuRng> {
        curand_available()?;
        dev.stream()
            .context()
            .bind_to_thread()
            .map_err(dev_err("binding the CUDA context"))?;
        // cudarc panics on a missing symbol (an old libcurand): report it as an error.
        let created = catch_unwind(AssertUnwindSafe(|| {
            cr::create_generator_kind(cs::curandRngType_t::CURAND_RNG_PSEUDO_PHILOX4_32_10)
        }));
        let gen = match created {
            Ok(r) => r.map_err(dev_err("creating the cuRAND generator"))?,
            Err(_) => return Err(ModelError::Device(missing_curand())),
        };
        let rng = GpuRng { gen };
        // SAFETY: the generator was just created; the stream lives as long as the device,
        // which outlives the engine's generator.
        unsafe { cr::set_stream(rng.gen, dev.stream().cu_stream() as _) }
            .map_err(dev_err("binding cuRAND to the stream"))?;
        Ok(rng)
    }

    /// Queues `n` f32 uniforms in `(0, 1]` of the stream `seed` (from offset 0) into the start
    /// of `out` (f32), on the device's stream.
    pub fn uniform(&self, seed: u64, out: &mut DeviceTensor, n: usize) -> R {
        if out.dtype() != Storage::F32 || n > out.numel() {
            return Err(ModelError::Device(format!(
                "internal: {n} uniforms into a {:?} buffer of {}",
                out.dtype(),
                out.numel()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        // SAFETY: the generator is live; `out` holds at least `n` f32 values and stays
        // allocated until the stream has run (the workspace outlives the step).
        unsafe {
            cr::set_seed(self.gen, seed).map_err(dev_err("seeding cuRAND"))?;
            cr::set_offset(self.gen, 0).map_err(dev_err("seeding cuRAND"))?;
            generate::uniform_f32(self.gen, out.device_ptr() as *mut f32, n)
                .map_err(dev_err("drawing dropout uniforms"))
        }
    }
}

impl Drop for GpuRng {
    fn drop(&mut self) {
        // SAFETY: created by `new`, destroyed once.
        if let Err(e) = unsafe { cr::destroy_generator(self.gen) } {
            tracing::warn!("destroying the cuRAND generator: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_seeds_differ_by_seed_layer_and_site() {
        let a = site_seed(7, 2, Site::Lora(1));
        assert_eq!(a, site_seed(7, 2, Site::Lora(1)));
        for b in [
            site_seed(8, 2, Site::Lora(1)),
            site_seed(7, 3, Site::Lora(1)),
            site_seed(7, 2, Site::Lora(2)),
            site_seed(7, 2, Site::AttnResidual),
        ] {
            assert_ne!(a, b);
        }
    }
}
