//! The generated launchers against a mock [`Launcher`]: variant selection (element type,
//! alignment class), grid, parameter order, and every rejection (each naming the kernel and the
//! argument at fault, and launching nothing).

use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::{Arch, KernelParam, LaunchError, LaunchSpec, Launcher, TensorArg};
use lexp_kernels::{axpby, flash_bwd_delta, softmax};
use std::cell::RefCell;

/// One recorded launch.
#[derive(Clone, Debug, PartialEq)]
struct Launched {
    symbol: &'static str,
    kernel: &'static str,
    params_of_variant: &'static [(&'static str, &'static str)],
    align: usize,
    grid: [u32; 3],
    params: Vec<KernelParam>,
}

/// Records every launch instead of running it.
#[derive(Default)]
struct MockLauncher {
    launched: RefCell<Vec<Launched>>,
}

impl Launcher for MockLauncher {
    fn arch(&self) -> Arch {
        Arch::Sm90
    }

    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<(), LaunchError> {
        self.launched.borrow_mut().push(Launched {
            symbol: spec.variant.symbol,
            kernel: spec.variant.kernel,
            params_of_variant: spec.variant.params,
            align: spec.variant.align,
            grid: spec.grid,
            params: spec.params.to_vec(),
        });
        Ok(())
    }
}

impl MockLauncher {
    fn launches(&self) -> Vec<Launched> {
        self.launched.borrow().clone()
    }

    /// The single launch recorded so far.
    fn only(&self) -> Launched {
        let l = self.launches();
        assert_eq!(l.len(), 1, "expected exactly one launch, got {l:#?}");
        l[0].clone()
    }

    fn assert_nothing_launched(&self) {
        let l = self.launches();
        assert!(l.is_empty(), "a rejected call launched something: {l:#?}");
    }
}

const X: u64 = 0x1000_0000;
const Y: u64 = 0x2000_0000;

fn t2(ptr: u64, dtype: Storage, rows: usize, cols: usize) -> TensorArg {
    TensorArg::contiguous(ptr, dtype, &[rows, cols])
}

fn strided(ptr: u64, dtype: Storage, dims: &[usize], strides: &[usize]) -> TensorArg {
    TensorArg {
        ptr,
        dtype,
        dims: dims.to_vec(),
        strides: strides.to_vec(),
    }
}

fn launch_softmax(x: &TensorArg, y: &TensorArg) -> (MockLauncher, Result<(), LaunchError>) {
    let l = MockLauncher::default();
    let r = softmax::launch(&l, &softmax::Args { x, y });
    (l, r)
}

/// Asserts `r` is `BadArgument` for `arg` of `kernel` whose reason contains `reason`, that its
/// Display names both, and that nothing was launched.
fn assert_bad_argument(
    l: &MockLauncher,
    r: Result<(), LaunchError>,
    kernel: &str,
    arg: &str,
    reason: &str,
) -> String {
    let e = r.expect_err("the launch should have been rejected");
    let shown = e.to_string();
    match &e {
        LaunchError::BadArgument {
            kernel: k,
            arg: a,
            reason: why,
        } => {
            assert_eq!(*k, kernel, "{shown}");
            assert_eq!(*a, arg, "{shown}");
            assert!(why.contains(reason), "reason {why:?} lacks {reason:?}");
        }
        other => panic!("expected BadArgument, got {other:?} ({shown})"),
    }
    assert!(shown.contains(&format!("kernel `{kernel}`")), "{shown}");
    assert!(shown.contains(&format!("argument `{arg}`")), "{shown}");
    l.assert_nothing_launched();
    shown
}

// ---------------------------------------------------------------------------------------------
// Valid launches.

#[test]
fn softmax_bf16_aligned_picks_a16_grid_and_params() {
    let (rows, cols) = (32, 1024);
    let x = t2(X, Storage::BF16, rows, cols);
    let y = t2(Y, Storage::BF16, rows, cols);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("valid launch");
    let got = l.only();
    assert_eq!(got.kernel, "softmax");
    assert!(got.symbol.starts_with("softmax_bf16"), "{}", got.symbol);
    assert!(got.symbol.ends_with("_a16"), "{}", got.symbol);
    assert_eq!(got.align, 16);
    assert!(got.params_of_variant.contains(&("T", "bf16")));
    // The default constants: the first listed value of each.
    assert!(got.params_of_variant.contains(&("BLOCK", "4096")));
    assert!(got.params_of_variant.contains(&("CHUNK", "1024")));
    // One program per row.
    assert_eq!(got.grid, [rows as u32, 1, 1]);
    // Per tensor: pointer, dims, strides of all but the last dimension.
    assert_eq!(
        got.params,
        vec![
            KernelParam::Ptr(X),
            KernelParam::I64(rows as i64),
            KernelParam::I64(cols as i64),
            KernelParam::I64(cols as i64),
            KernelParam::Ptr(Y),
            KernelParam::I64(rows as i64),
            KernelParam::I64(cols as i64),
            KernelParam::I64(cols as i64),
        ]
    );
    // The variant exists for the mock's architecture.
    let v = softmax::VARIANTS
        .iter()
        .find(|v| v.symbol == got.symbol)
        .expect("launched symbol is one of VARIANTS");
    assert!(v.ptx(l.arch()).contains(got.symbol));
}

#[test]
fn softmax_padded_rows_pass_the_row_stride() {
    // Rows of 1000 elements stored 1024 apart: the stride is pushed, not the row length.
    let x = strided(X, Storage::F32, &[8, 1000], &[1024, 1]);
    let y = strided(Y, Storage::F32, &[8, 1000], &[1024, 1]);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("valid launch");
    let got = l.only();
    assert!(got.params_of_variant.contains(&("T", "f32")));
    // 1000 f32 = 4000 bytes, a multiple of 16: still the aligned class.
    assert!(got.symbol.ends_with("_a16"), "{}", got.symbol);
    assert_eq!(got.grid, [8, 1, 1]);
    assert_eq!(
        got.params,
        vec![
            KernelParam::Ptr(X),
            KernelParam::I64(8),
            KernelParam::I64(1000),
            KernelParam::I64(1024),
            KernelParam::Ptr(Y),
            KernelParam::I64(8),
            KernelParam::I64(1000),
            KernelParam::I64(1024),
        ]
    );
}

#[test]
fn element_aligned_pointer_picks_a0() {
    let x = t2(X + 2, Storage::BF16, 4, 1024);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("an element-aligned pointer is valid");
    let got = l.only();
    assert!(got.symbol.starts_with("softmax_bf16"), "{}", got.symbol);
    assert!(got.symbol.ends_with("_a0"), "{}", got.symbol);
    assert_eq!(got.align, 0);
    assert_eq!(got.params[0], KernelParam::Ptr(X + 2));
}

#[test]
fn row_length_not_a_multiple_of_16_bytes_picks_a0() {
    // 1001 bf16 per row: neither the row length nor the row stride is a multiple of 8 elements.
    let x = t2(X, Storage::BF16, 4, 1001);
    let y = t2(Y, Storage::BF16, 4, 1001);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("valid launch");
    let got = l.only();
    assert!(got.symbol.ends_with("_a0"), "{}", got.symbol);
    assert_eq!(got.grid, [4, 1, 1]);
    assert_eq!(got.params[2], KernelParam::I64(1001));
}

#[test]
fn row_stride_not_a_multiple_of_16_bytes_picks_a0() {
    // Row length 1024 is fine, but rows are 1028 bf16 (2056 bytes) apart.
    let x = strided(X, Storage::BF16, &[4, 1024], &[1028, 1]);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("valid launch");
    assert!(l.only().symbol.ends_with("_a0"));
}

#[test]
fn axpby_grid_scalars_and_params() {
    let n = 10_001;
    let x = TensorArg::contiguous(X, Storage::F16, &[n]);
    let y = TensorArg::contiguous(Y, Storage::F16, &[n]);
    let l = MockLauncher::default();
    axpby::launch(
        &l,
        &axpby::Args {
            a: 2.0,
            x: &x,
            b: -0.5,
            y: &y,
        },
    )
    .expect("valid launch");
    let got = l.only();
    assert!(got.symbol.starts_with("axpby_f16"), "{}", got.symbol);
    assert!(
        got.symbol.ends_with("_a0"),
        "10001 f16 is not a multiple of 8: {}",
        got.symbol
    );
    let block: usize = got
        .params_of_variant
        .iter()
        .find(|(n, _)| *n == "BLOCK")
        .map(|(_, v)| v.parse().expect("BLOCK value"))
        .expect("BLOCK");
    assert_eq!(got.grid, [n.div_ceil(block) as u32, 1, 1]);
    // Scalars in place, rank-1 tensors push no strides.
    assert_eq!(
        got.params,
        vec![
            KernelParam::F32(2.0),
            KernelParam::Ptr(X),
            KernelParam::I64(n as i64),
            KernelParam::F32(-0.5),
            KernelParam::Ptr(Y),
            KernelParam::I64(n as i64),
        ]
    );
}

#[test]
fn launch_with_the_compiled_constant_value() {
    let x = t2(X, Storage::F32, 2, 64);
    let y = t2(Y, Storage::F32, 2, 64);
    let l = MockLauncher::default();
    softmax::launch_with(&l, &[("BLOCK", 4096)], &softmax::Args { x: &x, y: &y })
        .expect("BLOCK = 4096 is compiled");
    assert!(l.only().params_of_variant.contains(&("BLOCK", "4096")));
}

// ---------------------------------------------------------------------------------------------
// Rejections.

#[test]
fn wrong_rank_is_rejected() {
    let x = TensorArg::contiguous(X, Storage::BF16, &[1024]);
    let y = t2(Y, Storage::BF16, 1, 1024);
    let (l, r) = launch_softmax(&x, &y);
    let shown = assert_bad_argument(&l, r, "softmax", "x", "expected 2 dimensions");
    assert!(shown.contains("[1024]"), "{shown}");
}

#[test]
fn dims_and_strides_of_different_lengths_are_rejected() {
    let x = strided(X, Storage::BF16, &[4, 1024], &[1024]);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    assert_bad_argument(&l, r, "softmax", "x", "expected 2 dimensions");
}

#[test]
fn mixed_dtypes_are_rejected() {
    let x = t2(X, Storage::BF16, 4, 1024);
    let y = t2(Y, Storage::F32, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    let shown = assert_bad_argument(&l, r, "softmax", "y", "element type f32");
    assert!(shown.contains("bf16"), "{shown}");
}

#[test]
fn non_contiguous_last_dimension_is_rejected() {
    let x = strided(X, Storage::BF16, &[4, 1024], &[2048, 2]);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    let shown = assert_bad_argument(&l, r, "softmax", "x", "must be contiguous");
    assert!(shown.contains("stride 2"), "{shown}");
}

#[test]
fn pointer_not_aligned_to_the_element_is_rejected() {
    let x = t2(X, Storage::BF16, 4, 1024);
    let y = t2(Y + 1, Storage::BF16, 4, 1024);
    let (l, r) = launch_softmax(&x, &y);
    let shown = assert_bad_argument(&l, r, "softmax", "y", "not aligned");
    assert!(shown.contains("0x20000001"), "{shown}");
}

#[test]
fn overlapping_rows_are_rejected() {
    let x = t2(X, Storage::BF16, 4, 1024);
    let y = strided(Y, Storage::BF16, &[4, 1024], &[512, 1]);
    let (l, r) = launch_softmax(&x, &y);
    let shown = assert_bad_argument(&l, r, "softmax", "y", "dimension 0 overlaps");
    assert!(shown.contains("512") && shown.contains("1024"), "{shown}");
}

/// Rank-3 tensors (the flash kernels' per-head views `[T, heads, hd]`): a view of heads of 80
/// on the 128 tile launches one program row per head; a view whose head stride is shorter than
/// the head overlaps the next head and is rejected, naming the dimension.
#[test]
fn rank_3_views_launch_and_overlapping_heads_are_rejected() {
    let (t, nh, hd) = (100, 3, 80);
    let o = TensorArg::contiguous(X, Storage::BF16, &[t, nh, hd]);
    let d_o = TensorArg::contiguous(Y, Storage::BF16, &[t, nh, hd]);
    let delta = t2(0x3000_0000, Storage::F32, nh, 104);
    let l = MockLauncher::default();
    let args = flash_bwd_delta::Args {
        o: &o,
        d_o: &d_o,
        delta: &delta,
    };
    flash_bwd_delta::launch_with(&l, &[("D", 128)], &args).unwrap();
    let got = l.only();
    assert_eq!(got.grid, [4, 3, 1], "cdiv(100, 32) row blocks x 3 heads");
    assert_eq!(got.align, 16);
    // Heads 64 apart but 80 wide: each overlaps the next.
    let bad = strided(Y, Storage::BF16, &[t, nh, hd], &[nh * hd, 64, 1]);
    let l = MockLauncher::default();
    let r = flash_bwd_delta::launch_with(
        &l,
        &[("D", 128)],
        &flash_bwd_delta::Args {
            o: &o,
            d_o: &bad,
            delta: &delta,
        },
    );
    let shown = assert_bad_argument(&l, r, "flash_bwd_delta", "d_o", "dimension 1 overlaps");
    assert!(shown.contains("stride 64"), "{shown}");
    // A head wider than the tile is refused by the kernel's requirements.
    let wide = TensorArg::contiguous(Y, Storage::BF16, &[t, nh, 136]);
    let l = MockLauncher::default();
    let r = flash_bwd_delta::launch_with(
        &l,
        &[("D", 128)],
        &flash_bwd_delta::Args {
            o: &wide,
            d_o: &wide,
            delta: &delta,
        },
    );
    assert!(matches!(r, Err(LaunchError::Requirement { .. })), "{r:?}");
    l.assert_nothing_launched();
}

/// Asserts `r` is a `Requirement` error of `kernel` for `requirement` and nothing launched.
fn assert_requirement(l: &MockLauncher, r: Result<(), LaunchError>, kernel: &str, args: &[&str]) {
    let e = r.expect_err("the launch should have been rejected");
    let shown = e.to_string();
    match &e {
        LaunchError::Requirement { kernel: k, .. } => assert_eq!(*k, kernel, "{shown}"),
        other => panic!("expected Requirement, got {other:?} ({shown})"),
    }
    assert!(shown.contains(&format!("kernel `{kernel}`")), "{shown}");
    for a in args {
        assert!(shown.contains(a), "{shown} does not name {a}");
    }
    l.assert_nothing_launched();
}

/// The violated requirement's text without whitespace.
fn requirement_of(r: &Result<(), LaunchError>) -> String {
    match r {
        Err(LaunchError::Requirement { requirement, .. }) => {
            requirement.split_whitespace().collect()
        }
        other => panic!("expected Requirement, got {other:?}"),
    }
}

#[test]
fn softmax_mismatched_rows_violate_require() {
    let x = t2(X, Storage::BF16, 32, 1024);
    let y = t2(Y, Storage::BF16, 16, 1024);
    let (l, r) = launch_softmax(&x, &y);
    println!("{}", r.as_ref().expect_err("rejected"));
    // The first requirement, `x.dim(0) == y.dim(0)`, however the tokens are spaced.
    assert_eq!(requirement_of(&r), "x.dim(0)==y.dim(0)");
    assert_requirement(&l, r, "softmax", &["x", "y", "dim"]);
}

#[test]
fn softmax_mismatched_columns_violate_require() {
    let x = t2(X, Storage::BF16, 32, 1024);
    let y = t2(Y, Storage::BF16, 32, 512);
    let (l, r) = launch_softmax(&x, &y);
    assert_eq!(requirement_of(&r), "x.dim(1)==y.dim(1)");
    assert_requirement(&l, r, "softmax", &["x", "y"]);
}

#[test]
fn axpby_mismatched_lengths_violate_require() {
    let x = TensorArg::contiguous(X, Storage::F32, &[1000]);
    let y = TensorArg::contiguous(Y, Storage::F32, &[1024]);
    let l = MockLauncher::default();
    let r = axpby::launch(
        &l,
        &axpby::Args {
            a: 1.0,
            x: &x,
            b: 1.0,
            y: &y,
        },
    );
    println!("{}", r.as_ref().expect_err("rejected"));
    assert_requirement(&l, r, "axpby", &["x", "y"]);
}

#[test]
fn uncompiled_constant_value_is_rejected() {
    let x = t2(X, Storage::BF16, 4, 1024);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let l = MockLauncher::default();
    let r = softmax::launch_with(&l, &[("BLOCK", 123)], &softmax::Args { x: &x, y: &y });
    let e = r.expect_err("BLOCK = 123 is not compiled");
    let shown = e.to_string();
    assert!(
        matches!(
            &e,
            LaunchError::NoVariant {
                kernel: "softmax",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(shown.contains("kernel `softmax`"), "{shown}");
    assert!(shown.contains("BLOCK = 123"), "{shown}");
    assert!(shown.contains("4096"), "lists the compiled values: {shown}");
    l.assert_nothing_launched();
}

/// A misspelt constant name is an error naming it, not a silent fallback to the default.
#[test]
fn unknown_constant_name_is_rejected() {
    let x = t2(X, Storage::BF16, 4, 1024);
    let y = t2(Y, Storage::BF16, 4, 1024);
    let l = MockLauncher::default();
    let r = softmax::launch_with(&l, &[("BLOK", 4096)], &softmax::Args { x: &x, y: &y });
    let e = r.expect_err("BLOK is not a constant of softmax");
    assert!(e.to_string().contains("BLOK"), "{e}");
    l.assert_nothing_launched();
}

#[test]
fn grid_beyond_the_hardware_limit_is_rejected() {
    // 2^31 rows of 8 elements: one program per row exceeds grid.x <= 2^31 - 1. Nothing is
    // dereferenced, so a fake pointer is fine.
    let rows = 1usize << 31;
    let x = t2(X, Storage::BF16, rows, 8);
    let y = t2(Y, Storage::BF16, rows, 8);
    let (l, r) = launch_softmax(&x, &y);
    let e = r.expect_err("grid too large");
    let shown = e.to_string();
    assert_eq!(
        e,
        LaunchError::Grid {
            kernel: "softmax",
            grid: [rows as u64, 1, 1]
        }
    );
    assert!(shown.contains("kernel `softmax`"), "{shown}");
    assert!(shown.contains(&rows.to_string()), "{shown}");
    l.assert_nothing_launched();
}

#[test]
fn largest_grid_is_accepted() {
    let rows = i32::MAX as usize;
    let x = t2(X, Storage::BF16, rows, 8);
    let y = t2(Y, Storage::BF16, rows, 8);
    let (l, r) = launch_softmax(&x, &y);
    r.expect("2^31 - 1 programs is within the limit");
    assert_eq!(l.only().grid, [i32::MAX as u32, 1, 1]);
}

#[test]
fn checks_run_in_argument_order_and_stop_at_the_first_fault() {
    // Both tensors are bad; `x` is reported.
    let x = strided(X + 1, Storage::BF16, &[4, 1024], &[1024, 2]);
    let y = TensorArg::contiguous(Y, Storage::F32, &[3]);
    let (l, r) = launch_softmax(&x, &y);
    assert_bad_argument(&l, r, "softmax", "x", "contiguous");
}
