//! The SASS (what the GPU runs) of the tensor-core kernels contains tensor-core instructions:
//! `HMMA.16816.F32` fed by `LDSM` (ldmatrix) and `LDGSTS` (cp.async) on sm_80, and `HGMMA`
//! (warpgroup MMA) for the warpgroup-shaped variants on sm_90a. Checked with ptxas and
//! nvdisasm (PyPI `nvidia-cuda-nvdisasm`) for the first bf16 variant of each warp count.

use lexp_tests::{find_nvdisasm, find_ptxas, sass};

use lexp_kernels::TENSOR_CORE as TENSOR_CORE_KERNELS;

#[test]
fn tensor_core_kernels_use_tensor_core_instructions() {
    let ptxas = find_ptxas().unwrap_or_else(|| {
        panic!("ptxas not found: python3 -m pip install nvidia-cuda-nvcc-cu12 (.ci/run does this)")
    });
    let nvdisasm = find_nvdisasm().unwrap_or_else(|| {
        panic!(
            "nvdisasm not found: python3 -m pip install nvidia-cuda-nvdisasm (.ci/run does this)"
        )
    });
    let mut failures = vec![];
    let mut checked = 0;
    for name in TENSOR_CORE_KERNELS {
        let k = lexp_kernels::find(name).unwrap_or_else(|| panic!("no kernel {name}"));
        for warps in ["4", "8"] {
            let Some(v) = k
                .variants
                .iter()
                .find(|v| v.param("T") == Some("bf16") && v.param("W") == Some(warps))
            else {
                continue;
            };
            let s80 = sass(&ptxas, &nvdisasm, v.ptx_sm80, "sm_80")
                .unwrap_or_else(|e| panic!("{} sm_80: {e}", v.symbol));
            for want in ["HMMA.16816.F32.BF16", "LDSM.16.M", "LDGSTS.E.BYPASS.128"] {
                if !s80.contains(want) {
                    failures.push(format!("{} sm_80: no {want}", v.symbol));
                }
            }
            let s90 = sass(&ptxas, &nvdisasm, v.ptx_sm90, "sm_90a")
                .unwrap_or_else(|e| panic!("{} sm_90a: {e}", v.symbol));
            if !(s90.contains("HGMMA.64x") || s90.contains("HMMA.16816.F32.BF16")) {
                failures.push(format!("{} sm_90a: no HGMMA or HMMA", v.symbol));
            }
            // 8-warp GEMMs have warpgroup-shaped accumulators: wgmma on sm_90.
            if warps == "8" && name.starts_with("gemm") && !s90.contains("HGMMA.64x") {
                failures.push(format!("{} sm_90a: no HGMMA", v.symbol));
            }
            checked += 1;
        }
    }
    assert!(
        checked >= TENSOR_CORE_KERNELS.len(),
        "only {checked} variants checked"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The mma-to-dot register shortcut (COMPILER.md §1.7) survives ptxas: in flash attention's
/// `P·V` (forward), `dS·K` (dq with 128-query blocks) and `Pᵀ·dO`, `dSᵀ·Q` (dk/dv with
/// 128-key blocks), where the accumulator's warps own
/// whole rows, the sm_90a SASS has HGMMAs whose A operand is a register (`HGMMA.64xNx16 Rd,
/// Ra, gdesc[..]`) next to the descriptor-fed ones of `Q·Kᵀ`; on sm_80 the A fragments are
/// packed by `F2FP` instead of loaded with `LDSM` (the `LDSM` count is that of the other
/// operands only).
#[test]
fn flash_attention_feeds_p_to_the_mma_from_registers() {
    let ptxas = find_ptxas().expect("ptxas");
    let nvdisasm = find_nvdisasm().expect("nvdisasm");
    // Operand 2 of each HGMMA line: a register (`R..`) or a descriptor (`gdesc[..]`).
    let hgmma_a_operands = |s: &str| -> (usize, usize) {
        let mut regs = 0;
        let mut descs = 0;
        for line in s.lines().filter(|l| l.contains("HGMMA.64x")) {
            let ops = line.split_once("HGMMA.").map(|x| x.1).unwrap_or("");
            let ops: Vec<&str> = ops.split(',').collect();
            match ops.get(1).map(|o| o.trim()) {
                Some(o) if o.starts_with('R') => regs += 1,
                Some(o) if o.starts_with("gdesc") => descs += 1,
                _ => {}
            }
        }
        (regs, descs)
    };
    let mut checked = 0;
    // Non-transposed `LDSM` per variant on sm_80 (the loop body once, D = 64, 16 rows per
    // warp): q's fragments (D/16 = 4) and kᵀ's (BN/16 pairs of n-tiles x 4 k16 steps) in the
    // forward; q, kᵀ, dO and vᵀ in dq. The register operand (P, dS) would add K/16 more.
    for (name, param, value, ldsm) in [
        ("flash_fwd", "BN", "64", 4 + 16),
        ("flash_fwd", "BN", "128", 4 + 32),
        ("flash_bwd_dq", "BM", "128", 2 * (4 + 16)),
        // kᵀ-side: k, q (for Pᵀ) and v, dO (for dPᵀ); Pᵀ and dSᵀ come from registers.
        ("flash_bwd_dkdv", "BN", "128", 2 * (4 + 16)),
    ] {
        let k = lexp_kernels::find(name).unwrap();
        let v = k
            .variants
            .iter()
            .find(|v| v.param("T") == Some("bf16") && v.param(param) == Some(value))
            .unwrap_or_else(|| panic!("{name}: no bf16 variant with {param} = {value}"));
        let s90 = sass(&ptxas, &nvdisasm, v.ptx_sm90, "sm_90a").unwrap();
        let (regs, descs) = hgmma_a_operands(&s90);
        assert!(
            regs > 0 && descs > 0,
            "{}: {regs} register-A and {descs} descriptor-A HGMMAs",
            v.symbol
        );
        let s80 = sass(&ptxas, &nvdisasm, v.ptx_sm80, "sm_80").unwrap();
        assert_eq!(
            s80.matches("LDSM.16.M88.4").count(),
            ldsm,
            "{}: non-transposed ldmatrix of other operands only",
            v.symbol
        );
        assert!(s80.contains("F2FP.BF16"), "{}: no F2FP packing", v.symbol);
        checked += 1;
    }
    assert_eq!(checked, 4);
}
