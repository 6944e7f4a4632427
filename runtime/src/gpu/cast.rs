//! An f32 → bf16 conversion kernel, written directly in PTX.
//!
//! The LM-head backward needs `dh = dz·E` with `dz` the f32 output of the cross-entropy
//! kernel and `E` the bf16 embedding; cuBLAS wants both GEMM inputs of one type, and the DSL
//! kernels keep one storage type per kernel. Rounding `dz` to bf16 (what PyTorch's autocast
//! does with the logits' gradient) costs one pass over `[chunk, V]`, far less than an f32
//! copy of `E` and an f32 GEMM would. The kernel is a grid-stride loop, one element per thread
//! per iteration, rounding to nearest even (`cvt.rn.bf16.f32`, sm_80+).

use crate::buffer::DeviceTensor;
use crate::device::CudaDevice;
use crate::error::{failed, DeviceError, Result};
use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use lexp_compiler::dtype::Storage;

/// The kernel's entry name.
const ENTRY: &str = "lexp_cast_f32_bf16";

/// `dst[i] = bf16(src[i])` for `i < n` (params: src, dst, n as u64).
pub const PTX: &str = r#"
.version 7.8
.target sm_80
.address_size 64

.visible .entry lexp_cast_f32_bf16(
    .param .u64 p_src,
    .param .u64 p_dst,
    .param .u64 p_n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<5>;
    .reg .b64 %rd<10>;
    .reg .f32 %f<2>;
    .reg .b16 %h<2>;

    ld.param.u64 %rd1, [p_src];
    ld.param.u64 %rd2, [p_dst];
    ld.param.u64 %rd3, [p_n];
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mov.u32 %r1, %ctaid.x;
    mov.u32 %r2, %ntid.x;
    mov.u32 %r3, %tid.x;
    mov.u32 %r4, %nctaid.x;
    mul.wide.u32 %rd4, %r1, %r2;
    cvt.u64.u32 %rd5, %r3;
    add.u64 %rd4, %rd4, %rd5;
    mul.wide.u32 %rd6, %r4, %r2;
LOOP:
    setp.ge.u64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
    shl.b64 %rd7, %rd4, 2;
    add.u64 %rd8, %rd1, %rd7;
    ld.global.f32 %f1, [%rd8];
    cvt.rn.bf16.f32 %h1, %f1;
    shl.b64 %rd7, %rd4, 1;
    add.u64 %rd9, %rd2, %rd7;
    st.global.b16 [%rd9], %h1;
    add.u64 %rd4, %rd4, %rd6;
    bra LOOP;
DONE:
    ret;
}
"#;

/// Threads per block.
const THREADS: u32 = 256;
/// Most blocks launched (the loop strides over the rest).
const MAX_BLOCKS: u64 = 8192;

/// The loaded conversion kernel of one device.
pub struct CastKernel {
    func: CudaFunction,
}

impl CastKernel {
    /// Loads the PTX on `dev` (JIT-compiled by the driver for the device's architecture).
    pub fn load(dev: &CudaDevice) -> Result<CastKernel> {
        let module = dev
            .context()
            .load_module(Ptx::from_src(PTX))
            .map_err(failed("loading the f32 -> bf16 conversion kernel"))?;
        let func = module
            .load_function(ENTRY)
            .map_err(failed("finding the f32 -> bf16 conversion kernel"))?;
        Ok(CastKernel { func })
    }

    /// Queues `dst[..n] = bf16(src[..n])` on the device's stream; `src` is f32 and `dst` bf16,
    /// both holding at least `n` elements.
    pub fn f32_to_bf16(
        &self,
        dev: &CudaDevice,
        src: &DeviceTensor,
        dst: &mut DeviceTensor,
        n: usize,
    ) -> Result<()> {
        if src.dtype() != Storage::F32 || dst.dtype() != Storage::BF16 {
            return Err(DeviceError::InvalidArgument(format!(
                "f32 -> bf16 conversion of a {} tensor into a {} tensor",
                src.dtype().name(),
                dst.dtype().name()
            )));
        }
        if n > src.numel() || n > dst.numel() {
            return Err(DeviceError::Shape(format!(
                "converting {n} elements: source holds {}, destination {}",
                src.numel(),
                dst.numel()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let blocks = (n as u64).div_ceil(THREADS as u64).min(MAX_BLOCKS) as u32;
        let (s, d, count) = (src.device_ptr(), dst.device_ptr(), n as u64);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = dev.stream().launch_builder(&self.func);
        b.arg(&s).arg(&d).arg(&count);
        // SAFETY: the entry takes (u64 src, u64 dst, u64 n); both buffers hold at least `n`
        // elements of the types checked above, and the launch is ordered on the stream that
        // owns them.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(failed("launching the f32 -> bf16 conversion"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptx_declares_the_entry_and_its_three_parameters() {
        assert!(PTX.contains(&format!(".visible .entry {ENTRY}(")));
        assert_eq!(PTX.matches(".param .u64").count(), 3);
        assert!(PTX.contains("cvt.rn.bf16.f32"));
    }

    /// The PTX assembles for sm_80 and sm_90 when NVIDIA's `ptxas` is on the PATH (the tests
    /// of the DSL use the same tool); skipped otherwise.
    #[test]
    fn ptx_assembles_with_ptxas() {
        let Ok(out) = std::process::Command::new("ptxas")
            .arg("--version")
            .output()
        else {
            eprintln!("skipped: ptxas not found");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("lexp-cast-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("cast.ptx");
        std::fs::write(&src, PTX).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let status = std::process::Command::new("ptxas")
                .args(["-arch", arch, "-o"])
                .arg(dir.join(format!("cast_{arch}.cubin")))
                .arg(&src)
                .status()
                .unwrap();
            assert!(status.success(), "ptxas -arch {arch} failed");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
