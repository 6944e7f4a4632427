//! GPU smoke test of the device layer. Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.
//!
//! Build here with `cargo test -p lexp-runtime --release --no-run`, run the binary on the GPU
//! machine with `LEXP_GPU_TESTS=1 <binary> --nocapture`. Everything is in one test so that one
//! device is opened once.

use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::{KernelParam, LaunchError, LaunchSpec, Launcher, Variant};
use lexp_runtime::timing::time_graph_ms;
use lexp_runtime::{
    copy_bandwidth, decode, encode, time_ms, CudaDevice, DeviceError, DeviceTensor,
};

/// `y[i] = x[i] * a + b` for `i < n` (f32), with one parameter of each `KernelParam` kind.
const AXPB_PTX: &str = r#"
.version 7.8
.target sm_80
.address_size 64

.visible .entry lexp_test_axpb(
    .param .u64 x,
    .param .u64 y,
    .param .s64 n,
    .param .f32 a,
    .param .s32 b
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<5>;
    .reg .b64 %rd<9>;
    .reg .f32 %f<5>;

    ld.param.u64 %rd1, [x];
    ld.param.u64 %rd2, [y];
    ld.param.s64 %rd3, [n];
    ld.param.f32 %f1, [a];
    ld.param.s32 %r1, [b];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mul.wide.u32 %rd4, %r2, %r3;
    cvt.u64.u32 %rd5, %r4;
    add.s64 %rd4, %rd4, %rd5;
    setp.ge.s64 %p1, %rd4, %rd3;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    shl.b64 %rd6, %rd4, 2;
    add.s64 %rd7, %rd1, %rd6;
    ld.global.f32 %f2, [%rd7];
    cvt.rn.f32.s32 %f3, %r1;
    fma.rn.f32 %f4, %f2, %f1, %f3;
    add.s64 %rd8, %rd2, %rd6;
    st.global.f32 [%rd8], %f4;
DONE:
    ret;
}
"#;

static AXPB: Variant = Variant {
    kernel: "lexp_test_axpb",
    symbol: "lexp_test_axpb",
    params: &[],
    align: 0,
    threads: 256,
    smem_bytes: 0,
    dynamic_smem: false,
    ir: "",
    ptx_sm80: AXPB_PTX,
    ptx_sm90: AXPB_PTX,
    tma: &[],
};

static BROKEN: Variant = Variant {
    kernel: "lexp_test_broken",
    symbol: "lexp_test_broken",
    params: &[],
    align: 0,
    threads: 32,
    smem_bytes: 0,
    dynamic_smem: false,
    ir: "",
    ptx_sm80: ".version 7.8\n.target sm_80\n.address_size 64\n.visible .entry lexp_test_broken() { bogus.instruction; }\n",
    ptx_sm90: ".version 7.8\n.target sm_80\n.address_size 64\n.visible .entry lexp_test_broken() { bogus.instruction; }\n",
    tma: &[],
};

/// Deterministic values in [-4, 4), never all zero.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn launch_axpb(
    dev: &CudaDevice,
    x: u64,
    y: u64,
    n: usize,
    a: f32,
    b: i32,
) -> Result<(), LaunchError> {
    let params = [
        KernelParam::Ptr(x),
        KernelParam::Ptr(y),
        KernelParam::I64(n as i64),
        KernelParam::F32(a),
        KernelParam::I32(b),
    ];
    let grid = [n.div_ceil(AXPB.threads as usize) as u32, 1, 1];
    dev.launch(&LaunchSpec {
        variant: &AXPB,
        grid,
        params: &params,
    })
}

#[test]
fn gpu_device_smoke() -> Result<(), DeviceError> {
    if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
        println!("gpu_device_smoke skipped (set LEXP_GPU_TESTS=1 to run on a GPU)");
        return Ok(());
    }
    let dev = CudaDevice::new(0)?;
    let (major, minor) = dev.compute_capability();
    let (free, total) = dev.mem_info()?;
    println!(
        "device: {} (sm_{major}{minor}, arch {:?}), {} of {} MiB free",
        dev.name(),
        dev.arch(),
        free >> 20,
        total >> 20
    );
    assert!(dev.arch().is_some(), "expected an sm_80+ GPU");

    // Upload / download round trip for every storage type: values come back rounded exactly
    // like the host encoder rounds them.
    let dims = [37, 129];
    let n = dims[0] * dims[1];
    let data = random(n, 7);
    for dtype in [Storage::BF16, Storage::F16, Storage::F32, Storage::I32] {
        let t = DeviceTensor::from_f32(&dev, dtype, &dims, &data)?;
        assert_eq!(t.bytes(), n * dtype.bytes());
        assert_eq!(t.to_bytes()?, encode(dtype, &data), "{dtype:?} bytes");
        assert_eq!(
            t.to_f32_vec()?,
            decode(dtype, &encode(dtype, &data)),
            "{dtype:?} values"
        );
    }
    let idx = DeviceTensor::from_i32(&dev, &[5], &[0, -1, 7, i32::MAX, i32::MIN])?;
    assert_eq!(idx.to_i32_vec()?, [0, -1, 7, i32::MAX, i32::MIN]);

    // Poison, then a device-to-device copy overwrites every element.
    let src = DeviceTensor::from_f32(&dev, Storage::BF16, &dims, &data)?;
    let mut dst = DeviceTensor::zeros(&dev, Storage::BF16, &dims)?;
    dst.poison()?;
    let poisoned = dst.to_bytes()?;
    assert!(
        poisoned.chunks_exact(2).all(|c| c == [0xC0, 0x7F]),
        "bf16 poison pattern"
    );
    assert!(dst.to_f32_vec()?.iter().all(|x| x.is_nan()));
    dst.copy_from(&src)?;
    assert_eq!(dst.to_f32_vec()?, src.to_f32_vec()?);
    dst.fill_zero()?;
    assert!(dst.to_f32_vec()?.iter().all(|&x| x == 0.0));
    for dtype in [Storage::F16, Storage::F32, Storage::I32] {
        let p = DeviceTensor::poisoned(&dev, dtype, &[3])?;
        assert_eq!(
            p.to_bytes()?,
            lexp_runtime::encode::poison_bytes(dtype, 3),
            "{dtype:?}"
        );
    }

    // A hand-written kernel through the Launcher: every KernelParam kind, a partial last
    // program, element-aligned (not 16-byte aligned) pointers, an empty grid.
    let x = DeviceTensor::from_f32(&dev, Storage::F32, &[n], &data)?;
    let mut y = DeviceTensor::poisoned(&dev, Storage::F32, &[n])?;
    launch_axpb(&dev, x.as_arg().ptr, y.as_arg().ptr, n, 1.5, -3)?;
    let want: Vec<f32> = data.iter().map(|v| v.mul_add(1.5, -3.0)).collect();
    assert_eq!(y.to_f32_vec()?, want);
    assert_eq!(dev.modules().len(), 1);
    let m = n - 2;
    y.poison()?;
    launch_axpb(
        &dev,
        x.offset_arg(1, &[m])?.ptr,
        y.offset_arg(1, &[m])?.ptr,
        m,
        2.0,
        1,
    )?;
    let got = y.to_f32_vec()?;
    assert!(
        got[0].is_nan() && got[n - 1].is_nan(),
        "wrote outside the offset range"
    );
    for i in 1..=m {
        assert_eq!(got[i], data[i].mul_add(2.0, 1.0), "element {i}");
    }
    launch_axpb(&dev, x.as_arg().ptr, y.as_arg().ptr, 0, 1.0, 0)?;
    dev.synchronize()?;

    // A broken module: the error names the symbol (and carries the JIT log when there is one).
    let err = dev
        .launch(&LaunchSpec {
            variant: &BROKEN,
            grid: [1, 1, 1],
            params: &[],
        })
        .unwrap_err();
    let msg = err.to_string();
    println!("broken module error: {msg}");
    assert!(msg.contains("lexp_test_broken"), "{msg}");

    // Timing and bandwidth.
    let t = time_ms(&dev, 3, 20, || {
        launch_axpb(&dev, x.as_arg().ptr, y.as_arg().ptr, n, 1.5, -3)
    })?;
    println!(
        "axpb over {n} floats: median {:.4} ms, min {:.4} ms",
        t.median(),
        t.min()
    );
    assert_eq!(t.times_ms.len(), 20);
    assert!(t.min() > 0.0 && t.median() >= t.min());
    assert!(t.host_ms > 0.0, "the host's queuing time is measured");

    // The same launch replayed from a CUDA graph: the graph really runs the kernel (the poisoned
    // output is written), one time per replay divided by the launches in it.
    y.poison()?;
    let g = time_graph_ms(&dev, 2, 10, 8, || {
        launch_axpb(&dev, x.as_arg().ptr, y.as_arg().ptr, n, 1.5, -3)
    })?;
    println!(
        "axpb from a graph of 8: median {:.4} ms per launch, host {:.4} ms per launch",
        g.median(),
        g.host_ms
    );
    assert_eq!(g.times_ms.len(), 10);
    assert!(g.min() > 0.0);
    assert_eq!(y.to_f32_vec()?, want);
    // A call that waits for the device cannot be captured: an error, and the stream still works.
    let sync_inside = time_graph_ms(&dev, 1, 1, 2, || dev.synchronize());
    println!("synchronising inside a capture: {sync_inside:?}");
    assert!(sync_inside.is_err());
    launch_axpb(&dev, x.as_arg().ptr, y.as_arg().ptr, n, 1.5, -3)?;
    dev.synchronize()?;
    for bytes in [1usize << 20, 64 << 20, 1 << 30] {
        let gbps = copy_bandwidth(&dev, bytes)?;
        println!(
            "device copy bandwidth at {} MiB: {gbps:.0} GB/s (read + write)",
            bytes >> 20
        );
        assert!(gbps > 1.0);
    }
    dev.synchronize()
}
