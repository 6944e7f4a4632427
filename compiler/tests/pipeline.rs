//! End-to-end checks of the pass pipeline on small IR texts.

use lexp_compiler::interp::{self, Buffer, InterpArg};
use lexp_compiler::ir::{parser, printer};
use lexp_compiler::passes;
use lexp_compiler::target;

const AXPBY: &str = include_str!("ir/axpby.ir");
const ROWSUM: &str = include_str!("ir/rowsum.ir");

#[test]
fn printer_and_parser_round_trip() {
    for text in [AXPBY, ROWSUM] {
        let k = parser::parse(text).expect("parses");
        let printed = printer::print(&k);
        let again = printer::print(&parser::parse(&printed).expect("reparses"));
        assert_eq!(printed, again);
    }
}

#[test]
fn interpreter_runs_axpby_and_rowsum() {
    let k = parser::parse(AXPBY).unwrap();
    let n = 1500usize;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let y: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut bufs = vec![
        Buffer::new(lexp_compiler::dtype::Storage::BF16, &x),
        Buffer::new(lexp_compiler::dtype::Storage::BF16, &y),
    ];
    let xb = bufs[0].data.clone();
    let yb = bufs[1].data.clone();
    let args = [
        InterpArg::F32(2.0),
        InterpArg::Ptr(0),
        InterpArg::I64(n as i64),
        InterpArg::F32(-0.5),
        InterpArg::Ptr(1),
        InterpArg::I64(n as i64),
    ];
    interp::run(&k, [2, 1, 1], &args, &mut bufs).unwrap();
    for i in 0..n {
        let want = half::bf16::from_f32(2.0 * xb[i] - 0.5 * yb[i]).to_f32();
        assert_eq!(bufs[1].data[i], want, "element {i}");
    }

    let k = parser::parse(ROWSUM).unwrap();
    let (rows, cols) = (3usize, 700usize);
    let x: Vec<f32> = (0..rows * cols).map(|i| (i % 13) as f32 - 6.0).collect();
    let mut bufs = vec![
        Buffer::new(lexp_compiler::dtype::Storage::F32, &x),
        Buffer::new(lexp_compiler::dtype::Storage::F32, &[0.0; 3]),
    ];
    let args = [
        InterpArg::Ptr(0),
        InterpArg::I64(rows as i64),
        InterpArg::I64(cols as i64),
        InterpArg::I64(cols as i64),
        InterpArg::Ptr(1),
    ];
    interp::run(&k, [rows, 1, 1], &args, &mut bufs).unwrap();
    for r in 0..rows {
        let want: f32 = x[r * cols..(r + 1) * cols].iter().sum();
        assert_eq!(bufs[1].data[r], want);
    }
}

#[test]
fn passes_run_and_lower() {
    for text in [AXPBY, ROWSUM] {
        let k = parser::parse(text).unwrap();
        let c = passes::compile(k, &target::SM90).unwrap();
        for (name, s) in &c.stages {
            println!("=== {name}\n{s}");
        }
        #[cfg(feature = "llvm")]
        {
            let l = lexp_compiler::codegen::lower(&c, &target::SM90, "k").unwrap();
            println!("{}", l.ptx);
        }
    }
}

#[test]
fn shared_memory_over_the_target_limit_is_a_compile_error() {
    // The row sum's 256-wide tile spans 2 warps (the other 2 duplicate them), so its reduction
    // needs 2 x 4 bytes of scratch; a target allowing 4 bytes must refuse it at compile time,
    // naming the kernel.
    let k = parser::parse(ROWSUM).unwrap();
    let tiny = target::Target {
        max_static_smem: 4,
        max_dynamic_smem: 4,
        ..target::SM90
    };
    let err = passes::compile(k, &tiny)
        .map(|_| ())
        .expect_err("over the limit");
    assert!(
        err.0.contains("rowsum") && err.0.contains("8 bytes of shared memory"),
        "{err}"
    );
    let k = parser::parse(ROWSUM).unwrap();
    assert_eq!(passes::compile(k, &target::SM90).unwrap().smem.total, 8);
}

#[test]
fn parser_errors_name_the_line() {
    let bad = AXPBY.replace("%8 = mul %6, %7 : i32", "%8 = mul %6, %99 : i32");
    let err = parser::parse(&bad).expect_err("undefined value");
    assert!(
        err.0.contains("IR line 4") && err.0.contains("%99"),
        "{err}"
    );
}

#[test]
fn convert_round_trips_through_text() {
    let text = "kernel @c(%0: ptr<f32> \"x\") warps 1 {\n  %1 = range 32 : i32[32]\n  %2 = convert %1 : i32[32]\n  %3 = cast %2 : i64[32]\n  %4 = splat %0 : ptr<f32>[32]\n  %5 = addptr %4, %3 : ptr<f32>[32]\n  %6 = load %5 : f32[32]\n  store %5, %6\n}\n";
    let k = parser::parse(text).unwrap();
    assert_eq!(printer::print(&k), text);
}
