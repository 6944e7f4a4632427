//! DSL misuses of `#[kernel]`: each file under `tests/ui/` must fail to compile with a clear
//! message whose span covers the offending tokens (see the `.stderr` next to it).

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
