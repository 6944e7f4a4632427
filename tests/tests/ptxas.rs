//! Every kernel variant's PTX assembles with `ptxas` for sm_80 and sm_90, with no spills and
//! registers within the target's budget. Prints the resource table.
//!
//! A variant whose shared memory exceeds sm_80's opt-in limit can never launch there (the
//! launcher reports it and the autotuner skips it), so only its sm_90 code is held to the
//! budget; its sm_80 PTX must still assemble.

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
            let sm80_launchable = v.smem_bytes as usize <= target::SM80.max_dynamic_smem;
            for (arch, ptx) in [("sm_80", v.ptx_sm80), ("sm_90a", v.ptx_sm90)] {
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
                        let budgeted = arch != "sm_80" || sm80_launchable;
                        if budgeted
                            && (r.spill_stores > 0 || r.spill_loads > 0 || r.stack_bytes > 0)
                        {
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
