//! Every kernel variant's PTX assembles with `ptxas` for sm_80 and sm_90, with registers
//! within the target's budget and no spill that costs anything per iteration. Prints the
//! resource table, with two columns of ptxas's warpgroup-MMA notes (information, not failures):
//! `waits` counts the waits it added for MMA results read in flight (C7517: the flash dk/dv
//! kernels have one), `ser` says whether it serialised every MMA (C7514: non-MMA code
//! touches accumulators of MMAs in flight). On 2026-12-01 148 sm_90a variants were serialised:
//! most `cp.async` (`TMA = 0`) tile loops and the 3-stage TMA ones of the GEMMs and sparse
//! GEMMs; none of the configurations the engine runs (4-stage TMA) is.
//!
//! The spill budget: none at all, except that a variant may spill up to
//! [`SPILL_OUTSIDE_LOOPS`] bytes if its SASS (nvdisasm) shows no local-memory access inside a
//! loop. That happens when a value computed before the main loop is needed only after it (the
//! 128-key dk/dv kernels on sm_80, at 255 registers, keep their output address that way once
//! k and v are resident in shared memory): ptxas then stores it once and reloads it once,
//! which is the right allocation.
//!
//! The one exception is [`measured_spill`]: a variant that asks for more programs per
//! multiprocessor than its registers allow (`ctas = N`), whose spills inside the loop were
//! measured to cost less than the occupancy gains; it may spill up to the bytes listed there.
//!
//! A variant whose shared memory exceeds sm_80's opt-in limit can never launch there (the
//! launcher reports it and the autotuner skips it), so only its sm_90 code is held to the
//! budget; its sm_80 PTX must still assemble. The same holds for the variants of
//! [`sm90_only`], which the engine runs on sm_90 only (a smaller tile on sm_80).

use lexp_compiler::target;
use lexp_tests::{find_nvdisasm, find_ptxas, ptxas, sass, spills_in_loops};

/// Spill bytes (stores) a variant may have when none of them is inside a loop.
const SPILL_OUTSIDE_LOOPS: u32 = 32;

/// Variants the engine may run on sm_90 only, because their sm_80 code spills: the split dk/dv
/// with 128 keys in 64-query steps (`runtime/src/gpu/attention.rs`: `FLASH_80` takes 32-query
/// steps on sm_80, `FlashConfig::sm80`), and the 128-key and one-warpgroup tiles of heads of 128
/// (`FLASH_128`; sm_80 runs `FLASH_128_SM80`).
fn sm90_only(v: &lexp_compiler::launch::Variant) -> bool {
    let p = |name: &str, value: &str| v.param(name) == Some(value);
    match v.kernel {
        "flash_bwd_dkdv_split" => p("BN", "128") && p("BM", "64"),
        // Heads of 128 with 128 keys per program (dk/dv) or per step (forward): 255 registers
        // and spills on sm_80, which runs the 64-key tiles. The one-warpgroup dk/dv (64 keys,
        // 64-query steps, `W = 4`) likewise: on sm_90 its products are warpgroup MMAs (247
        // registers), on sm_80 four warps hold what eight do in the two-warpgroup tile.
        "flash_fwd" => p("D", "128") && p("BN", "128"),
        // The three-programs-per-multiprocessor dk/dv (`C = 3`, [`measured_spill`]) spills on
        // sm_80 too; `FLASH_64_SM80` runs two-warpgroup tiles.
        "flash_bwd_dkdv" => p("D", "128") && (p("BN", "128") || p("W", "4")) || p("C", "3"),
        // Heads of 128 in 128-query dq programs (`FLASH_128_LONGEST`): 255 registers and 44
        // bytes spilled on sm_80, which runs `FLASH_128_SM80`'s 64-query ones.
        "flash_bwd_dq" => p("D", "128") && p("BM", "128"),
        // The fused backward adds `dq` with the TMA's bulk reductions, which sm_80 lacks (its
        // code falls back to one atomic per element, call 81's slow form): the engine runs
        // it on sm_90 only (`FlashConfig::fused`), and its sm_80 code need only assemble.
        "flash_bwd_fused" => true,
        _ => false,
    }
}

/// Bytes (stores and loads, each) a variant may spill inside its loop on sm_90a, for the
/// variants measured faster with the spill than without it. `flash_bwd_dkdv` with `C = 3`: the
/// one-warpgroup tile of heads of 64 held to 168 registers so that three programs share a
/// multiprocessor (225 registers and two without), 48 bytes spilled and 52 reloaded in the key
/// loop; dk/dv 2–5% faster from 4 x 1024 to 1 x 16384 on the H200 (call 117,
/// `runtime/src/gpu/attention.rs`, `FLASH_64`). Since the vectorised layout conversion
/// (session 20) one more 4-byte reload, in an `mbarrier` wait's retry block after the exit,
/// not in the key loop: 56 bytes reloaded. Its sm_80 code (196 bytes spilled) is not run
/// ([`sm90_only`]).
fn measured_spill(v: &lexp_compiler::launch::Variant) -> Option<u32> {
    (v.kernel == "flash_bwd_dkdv" && v.param("C") == Some("3")).then_some(56)
}

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
        "{:<44} {:>6} {:>5} {:>6} {:>6} {:>6} {:>5} {:>4}",
        "variant", "arch", "regs", "spillS", "spillL", "smem", "waits", "ser"
    );
    for k in lexp_kernels::ALL {
        for v in k.variants {
            let sm80_launchable =
                v.smem_bytes as usize <= target::SM80.max_dynamic_smem && !sm90_only(v);
            for (arch, ptx) in [("sm_80", v.ptx_sm80), ("sm_90a", v.ptx_sm90)] {
                match ptxas(&bin, ptx, arch) {
                    Ok(r) => {
                        rows += 1;
                        println!(
                            "{:<44} {:>6} {:>5} {:>6} {:>6} {:>6} {:>5} {:>4}",
                            v.symbol,
                            arch,
                            r.registers,
                            r.spill_stores,
                            r.spill_loads,
                            r.smem_bytes,
                            r.injected_waits,
                            if r.serialized { "yes" } else { "-" }
                        );

                        let budgeted = arch != "sm_80" || sm80_launchable;
                        let spills = r.spill_stores > 0 || r.spill_loads > 0 || r.stack_bytes > 0;
                        let measured = measured_spill(v).filter(|_| arch == "sm_90a");
                        if let Some(most) = measured {
                            if r.spill_stores > most || r.spill_loads > most || r.stack_bytes > most
                            {
                                failures.push(format!(
                                    "{} {arch}: spills more than the {most} bytes measured ({r:?})",
                                    v.symbol
                                ));
                            }
                        } else if budgeted && spills {
                            if let Some(why) = spill_over_budget(&bin, ptx, arch, &r) {
                                failures.push(format!("{} {arch}: {why}", v.symbol));
                            }
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

/// Why `r`'s spills are over the budget (see the module doc), or `None` if they are within it.
fn spill_over_budget(
    ptxas: &std::path::Path,
    ptx: &str,
    arch: &str,
    r: &lexp_tests::PtxasReport,
) -> Option<String> {
    if r.spill_stores > SPILL_OUTSIDE_LOOPS || r.spill_loads > SPILL_OUTSIDE_LOOPS {
        return Some(format!(
            "spills more than {SPILL_OUTSIDE_LOOPS} bytes ({r:?})"
        ));
    }
    let Some(nvdisasm) = find_nvdisasm() else {
        return Some(format!(
            "spills ({r:?}); telling whether they are inside a loop needs nvdisasm: \
             python3 -m pip install nvidia-cuda-nvdisasm (.ci/run does this)"
        ));
    };
    match sass(ptxas, &nvdisasm, ptx, arch) {
        Err(e) => Some(format!("spills ({r:?}) and nvdisasm failed: {e}")),
        Ok(listing) => {
            let inside = spills_in_loops(&listing);
            (!inside.is_empty()).then(|| format!("spills inside a loop ({r:?}): {inside:?}"))
        }
    }
}
