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
