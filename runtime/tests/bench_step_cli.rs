//! `lexp bench step` driven as a user drives it, on the CPU engine and the bundled opt-tiny
//! checkpoint (fast in a debug build): the table, a JSON whose numbers are consistent with
//! each other and with the model, the comparison with a baseline file, and a PNG; bad inputs
//! fail with a message naming the setting.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const LEXP: &str = env!("CARGO_BIN_EXE_lexp");

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default/opt-tiny")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lexp-bench-step-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cpu_run_writes_json_compare_and_png() {
    let dir = temp_dir("ok");
    let (json, png, cmp, base) = (
        dir.join("x.json"),
        dir.join("x.png"),
        dir.join("c.json"),
        dir.join("torch.json"),
    );
    std::fs::write(
        &base,
        r#"{"runs": [
            {"batch_size": 2, "seq_len": 64, "attn": "sdpa", "median_step_ms": 3.0},
            {"batch_size": 2, "seq_len": 64, "attn": "eager", "median_step_ms": 6.0},
            {"batch_size": 4, "seq_len": 64, "attn": "sdpa", "median_step_ms": 1.0}]}"#,
    )
    .unwrap();
    let out = Command::new(LEXP)
        .args(["bench", "step", "--device", "cpu", "--model"])
        .arg(tiny())
        .args([
            "--seq", "64", "--batch", "2", "--iters", "2", "--warmup", "1",
        ])
        .args(["--commit", "abc1234", "--json"])
        .arg(&json)
        .arg("--png")
        .arg(&png)
        .arg("--baseline")
        .arg(&base)
        .arg("--compare")
        .arg(&cmp)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2x64") && stdout.contains("vs sdpa"),
        "{stdout}"
    );

    let j: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(j["device"]["kind"], "cpu");
    assert_eq!(j["lexp_commit"], "abc1234");
    assert_eq!(j["model"]["parameters"], 3_549_696);
    assert_eq!(j["lora"]["r"], 4);
    assert_eq!(j["date"].as_str().unwrap().len(), 10);
    let w = &j["workloads"].as_array().unwrap()[0];
    assert_eq!(
        (w["batch"].as_u64(), w["seq"].as_u64()),
        (Some(2), Some(64))
    );
    assert_eq!(
        (w["tokens"].as_u64(), w["targets"].as_u64()),
        (Some(128), Some(126))
    );
    let times: Vec<f64> = w["times_ms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    assert_eq!(times.len(), 2, "warm-up excluded");
    let med = w["step"]["median_ms"].as_f64().unwrap();
    assert!(times.contains(&med) && times.iter().all(|&t| t > 0.0));
    let tps = w["tokens_per_s"].as_f64().unwrap();
    assert!((tps - 128.0 / (med / 1e3)).abs() / tps < 1e-9);
    let flops = w["flops"]["total"].as_f64().unwrap();
    assert!((w["tflops"].as_f64().unwrap() - flops / (med / 1e3) / 1e12).abs() < 1e-9);
    // The linear layers alone: 2·T·layers·(4H² + 2HF) for opt-tiny (H 192, F 768, 4 layers).
    assert_eq!(
        w["flops"]["linear_forward"].as_f64().unwrap(),
        2.0 * 128.0 * 4.0 * (4.0 * 192.0 * 192.0 + 2.0 * 192.0 * 768.0)
    );
    assert!(w["loss_first"].as_f64().unwrap().is_finite());
    assert!(w["device_used_mib"].is_null());

    let c: Value = serde_json::from_slice(&std::fs::read(&cmp).unwrap()).unwrap();
    let row = &c["workloads"][0];
    assert_eq!(row["workload"], "2x64");
    assert!((row["speedup_vs_sdpa"].as_f64().unwrap() - 3.0 / med).abs() < 1e-9);
    assert!((row["speedup_vs_eager"].as_f64().unwrap() - 6.0 / med).abs() < 1e-9);
    assert_eq!(j["comparison"], c["workloads"]);

    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
    assert!(bytes.len() > 5_000, "a 960x600 chart with bars and text");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_fail_with_a_reason() {
    let run = |args: &[&str]| {
        let out = Command::new(LEXP)
            .args(["bench", "step", "--warmup", "0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let tiny = tiny().display().to_string();
    let cpu = |extra: &[&str]| -> String {
        let mut a = vec!["--device", "cpu", "--model", tiny.as_str(), "--seq", "8"];
        a.extend_from_slice(extra);
        run(&a)
    };
    assert!(run(&["--model", "opt-9b"]).contains("not a preset"));
    assert!(run(&["--model", &tiny, "--seq", "2048"]).contains("exceeds"));
    assert!(cpu(&["--lora-targets", "x_proj"]).contains("x_proj"));
    assert!(cpu(&["--iters", "0"]).contains("positive"));
    let e = cpu(&["--compare", "/tmp/never.json"]);
    assert!(e.contains("--baseline"), "{e}");
    // opt-350m is post-LN: the GPU engine refuses it before any weights are built.
    let e = run(&["--model", "opt-350m", "--device", "cuda", "--seq", "8"]);
    assert!(e.contains("post-LN"), "{e}");
}
