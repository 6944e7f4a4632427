//! `lexp check --cpu`: a kernel's checks run in the interpreter and print their rows; asking for
//! a kernel that this path has no check of, or that does not exist, fails with a message that
//! says so instead of passing with nothing checked.

use std::process::Command;

const LEXP: &str = env!("CARGO_BIN_EXE_lexp");

fn check(kernel: &str) -> (bool, String) {
    let out = Command::new(LEXP)
        .args(["check", "--cpu", "--kernel", kernel])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running lexp");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_lora_branch_kernels_are_checked_on_the_cpu() {
    for (kernel, rows) in [
        ("transpose_b", 2),
        ("lora_fold", 2),
        ("lora_wgrad_reduce_many", 2),
        ("lora_down", 4),
        ("lora_expand", 4),
        ("lora_wgrad", 4),
        ("lora_wgrad_pair", 2),
    ] {
        let (ok, text) = check(kernel);
        assert!(ok, "{kernel}: {text}");
        assert!(
            text.contains(&format!("{rows} passed, 0 failed")),
            "{kernel}: {text}"
        );
    }
}

#[test]
fn the_fused_mlp_output_kernel_is_checked_on_the_cpu() {
    let (ok, text) = check("sparse_fc2_fwd");
    assert!(ok, "{text}");
    assert!(text.contains("2 passed, 0 failed"), "{text}");
}

#[test]
fn a_kernel_without_a_check_here_or_an_unknown_one_fails() {
    let (ok, text) = check("flash_fwd");
    assert!(
        !ok && text.contains("no check of kernel `flash_fwd`"),
        "{text}"
    );
    let (ok, text) = check("no_such_kernel");
    assert!(!ok && text.contains("no kernel `no_such_kernel`"), "{text}");
}
