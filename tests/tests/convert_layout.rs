//! A tile used along two dimensions (here a vector used as both the rows and the columns of an
//! outer product, and the same range indexing both dimensions of the output) gets a layout
//! conversion through shared memory: the IR shows the `convert`s, the interpreter and the
//! CPU reference agree, and the PTX assembles.

use lexp_compiler::dtype::Storage;
use lexp_compiler::interp::HostTensor;
use lexp_macros::kernel;

/// `y[i, j] = x[i] * x[j]` for one 64 x 64 tile.
#[kernel(grid = [1], warps = 4)]
fn outer(x: Tensor<f32, 1>, y: TensorMut<f32, 2>) {
    let i = range::<64>();
    let v = x.load([i]);
    y.store([i, i], v.expand(1) * v.expand(0));
}

#[test]
fn the_ir_converts_and_the_result_is_right() {
    let v = &outer::VARIANTS[0];
    let k = lexp_compiler::ir::parser::parse(v.ir).unwrap();
    let c = lexp_compiler::passes::compile(k, &lexp_compiler::target::SM90).unwrap();
    let layouts = &c.stages.iter().find(|(n, _)| *n == "layouts").unwrap().1;
    assert!(layouts.matches(" convert ").count() >= 2, "{layouts}");
    assert!(c.smem.total > 0);

    for n in [64usize, 50] {
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 0.1).collect();
        let mut x = HostTensor::new(Storage::F32, &[n], &xs);
        let mut y = HostTensor::new(Storage::F32, &[n, n], &vec![f32::NAN; n * n]);
        outer::interpret(
            &[],
            outer::HostArgs {
                x: &mut x,
                y: &mut y,
            },
        )
        .unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(y.data[i * n + j], xs[i] * xs[j], "({i}, {j}) of {n}");
            }
        }
    }
}

#[test]
fn the_ptx_assembles() {
    let Some(bin) = lexp_tests::find_ptxas() else {
        panic!("ptxas not found (see README)")
    };
    for v in &outer::VARIANTS {
        for (arch, ptx) in [("sm_80", v.ptx_sm80), ("sm_90a", v.ptx_sm90)] {
            let r =
                lexp_tests::ptxas(&bin, ptx, arch).unwrap_or_else(|e| panic!("{}: {e}", v.symbol));
            assert_eq!(
                (r.spill_stores, r.spill_loads),
                (0, 0),
                "{} {arch}",
                v.symbol
            );
            assert_eq!(r.smem_bytes, v.smem_bytes, "{} {arch}", v.symbol);
        }
    }
}

/// On a GPU (`LEXP_GPU_TESTS=1`): the generated shared-memory conversion moves the right values,
/// for a full tile and a masked one, outputs poisoned first.
#[test]
fn on_the_gpu() {
    if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set LEXP_GPU_TESTS=1 on a machine with an NVIDIA GPU");
        return;
    }
    let dev = lexp_runtime::CudaDevice::new(0).expect("a CUDA device");
    for n in [64usize, 50] {
        let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() + 0.1).collect();
        let x = lexp_runtime::DeviceTensor::from_f32(&dev, Storage::F32, &[n], &xs).unwrap();
        let y = lexp_runtime::DeviceTensor::poisoned(&dev, Storage::F32, &[n, n]).unwrap();
        outer::launch(
            &dev,
            &outer::Args {
                x: &x.as_arg(),
                y: &y.as_arg(),
            },
        )
        .unwrap();
        dev.synchronize().unwrap();
        let got = y.to_f32_vec().unwrap();
        for i in 0..n {
            for j in 0..n {
                assert_eq!(got[i * n + j], xs[i] * xs[j], "({i}, {j}) of {n}");
            }
        }
        eprintln!("outer product {n}x{n} on {}: exact", dev.name());
    }
}
