//! Every kernel variant's PTX assembles with `ptxas` for sm_80 and sm_90, with no spills and
//! registers within the target's budget. Prints the resource table.

use lexp_compiler::target;
use lexp_tests::{find_ptxas, ptxas};

#[test]
fn every_variant_assembles_without_spills() {
    let Some(bin) = find_ptxas() else {
        panic!(
            "ptxas not found. Install it with `python3 -m pip install nvidia-cuda-nvcc-cu12` \
             (or set PTXAS=/path/to/ptxas); .ci/run does this."
        );
    };
    let mut failures = vec![];
    let mut rows = 0;
    println!(
        "{:<44} {:>6} {:>5} {:>6} {:>6} {:>6}",
        "variant", "arch", "regs", "spillS", "spillL", "smem"
    );
    for k in lexp_kernels::ALL {
        for v in k.variants {
            for (arch, ptx) in [("sm_80", v.ptx_sm80), ("sm_90", v.ptx_sm90)] {
                match ptxas(&bin, ptx, arch) {
                    Ok(r) => {
                        rows += 1;
                        println!(
                            "{:<44} {:>6} {:>5} {:>6} {:>6} {:>6}",
                            v.symbol,
                            arch,
                            r.registers,
                            r.spill_stores,
                            r.spill_loads,
                            r.smem_bytes
                        );
                        if r.spill_stores > 0 || r.spill_loads > 0 || r.stack_bytes > 0 {
                            failures.push(format!("{} {arch}: spills ({r:?})", v.symbol));
                        }
                        if r.registers as usize > target::SM90.max_regs {
                            failures
                                .push(format!("{} {arch}: {} registers", v.symbol, r.registers));
                        }
                        if r.smem_bytes != if v.dynamic_smem { 0 } else { v.smem_bytes } {
                            failures.push(format!(
                                "{} {arch}: ptxas reports {} B shared, plan says {}",
                                v.symbol, r.smem_bytes, v.smem_bytes
                            ));
                        }
                    }
                    Err(e) => failures.push(format!("{} {arch}: ptxas failed:\n{e}", v.symbol)),
                }
            }
        }
    }
    assert!(rows > 0, "no variants checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
