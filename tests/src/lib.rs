//! Helpers shared by the workspace integration tests: finding `ptxas` and `nvdisasm`, reading
//! ptxas's report, and disassembling a kernel to SASS.

use std::path::PathBuf;
use std::process::Command;

/// Where `ptxas` is: `$PTXAS`, else `ptxas` on the PATH, else the one pip's
/// `nvidia-cuda-nvcc-cu12` installs into site-packages.
pub fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS") {
        return Some(PathBuf::from(p));
    }
    if Command::new("ptxas")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Some(PathBuf::from("ptxas"));
    }
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args(["-c", "import nvidia.cuda_nvcc, os; print(os.path.join(list(nvidia.cuda_nvcc.__path__)[0], 'bin', 'ptxas'))"])
            .output();
        if let Ok(o) = out {
            let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if o.status.success() && p.exists() {
                return Some(p);
            }
        }
    }
    None
}

/// Where `nvdisasm` is: `$NVDISASM`, else `nvdisasm` on the PATH, else the one pip's
/// `nvidia-cuda-nvdisasm` installs into site-packages.
pub fn find_nvdisasm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVDISASM") {
        return Some(PathBuf::from(p));
    }
    if Command::new("nvdisasm")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        return Some(PathBuf::from("nvdisasm"));
    }
    for py in ["python3", "python"] {
        let out = Command::new(py)
            .args(["-c", "import nvidia, glob; print(next(iter(sorted(f for p in nvidia.__path__ for f in glob.glob(p + '/**/bin/nvdisasm', recursive=True))), ''))"])
            .output();
        if let Ok(o) = out {
            let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            if o.status.success() && p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Assembles `ptx` for `arch` into a cubin and returns its SASS text (`nvdisasm -c`).
pub fn sass(
    ptxas: &std::path::Path,
    nvdisasm: &std::path::Path,
    ptx: &str,
    arch: &str,
) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("lexp-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let tag = format!("{arch}-{:x}", ptx.len() ^ (ptx.as_ptr() as usize));
    let input = dir.join(format!("k-{tag}.ptx"));
    let cubin = dir.join(format!("k-{tag}.cubin"));
    std::fs::write(&input, ptx).map_err(|e| e.to_string())?;
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-o")
        .arg(&cubin)
        .arg(&input)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let _ = std::fs::remove_file(&input);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let dis = Command::new(nvdisasm)
        .arg("-c")
        .arg(&cubin)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvdisasm.display()))?;
    let _ = std::fs::remove_file(&cubin);
    if !dis.status.success() {
        return Err(String::from_utf8_lossy(&dis.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&dis.stdout).into_owned())
}

/// What `ptxas -v` reports for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxasReport {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
    /// Waits ptxas added for warpgroup MMA results read while in flight (its C7517 notes).
    pub injected_waits: u32,
    /// ptxas serialised the kernel's warpgroup MMAs (C7514): every MMA waits for the last.
    pub serialized: bool,
}

fn number_before(line: &str, suffix: &str) -> Option<u32> {
    let i = line.find(suffix)?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// Assembles `ptx` for `arch` (`sm_80`, `sm_90`) and parses the `-v` report.
pub fn ptxas(ptxas: &std::path::Path, ptx: &str, arch: &str) -> Result<PtxasReport, String> {
    let dir = std::env::temp_dir().join(format!("lexp-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let input = dir.join(format!(
        "k-{arch}-{:x}.ptx",
        ptx.len() ^ (ptx.as_ptr() as usize)
    ));
    std::fs::write(&input, ptx).map_err(|e| e.to_string())?;
    let out = Command::new(ptxas)
        .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
        .arg(&input)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let _ = std::fs::remove_file(&input);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(text);
    }
    let mut r = PtxasReport {
        registers: 0,
        spill_stores: 0,
        spill_loads: 0,
        stack_bytes: 0,
        smem_bytes: 0,
        injected_waits: 0,
        serialized: false,
    };
    for line in text.lines() {
        if line.contains("warpgroup.wait is injected") {
            r.injected_waits += 1;
        }
        if line.contains("wgmma.mma_async instructions are serialized") {
            // C7514 (its reason follows the phrase).
            r.serialized = true;
        }
        if let Some(n) = number_before(line, "registers") {
            r.registers = n;
        }
        if let Some(n) = number_before(line, "bytes smem") {
            r.smem_bytes = n;
        }
        if line.contains("bytes stack frame") {
            r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
    }
    Ok(r)
}

/// The local-memory accesses (`LDL`/`STL`: spills) of a SASS listing (`nvdisasm -c`) that lie
/// inside a loop, one line each. A spill outside every loop costs one store and one load per
/// thread; inside one it costs them per iteration, which is what a register budget is for.
///
/// A loop is the natural loop of a backward branch: the lines from which the branch can be
/// reached without passing its target (the loop head), found by walking predecessors back from
/// the branch. Not simply the span from the head to the branch: ptxas places the retry blocks
/// of `mbarrier` waits at the end of a kernel, branching back to the wait, and everything in
/// between (the epilogue) runs once.
pub fn spills_in_loops(sass: &str) -> Vec<String> {
    let lines: Vec<&str> = sass.lines().collect();
    let mut labels = std::collections::HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(name) = l.trim().strip_suffix(':') {
            if name.starts_with('.') {
                labels.insert(name.to_string(), i);
            }
        }
    }
    // Control flow per line: the branch target (`BRA`, `BRA.U`, `BRA.DIV`, … to `(.L_x_N)`)
    // and whether the next line follows (not after an unpredicated branch or exit).
    let mut preds: Vec<Vec<usize>> = vec![vec![]; lines.len()];
    let mut back_edges = vec![];
    for (i, l) in lines.iter().enumerate() {
        let code = l.split(';').next().unwrap_or("");
        let unpredicated = !code.contains(" @");
        let is_branch = code.contains(" BRA");
        let ends = unpredicated && (is_branch || code.contains(" EXIT") || code.contains(" RET"));
        if !ends && i + 1 < lines.len() {
            preds[i + 1].push(i);
        }
        if !is_branch {
            continue;
        }
        let target = code
            .split('(')
            .nth(1)
            .and_then(|t| t.split(')').next())
            .map(str::trim);
        if let Some(&j) = target.and_then(|t| labels.get(t)) {
            preds[j].push(i);
            if j <= i {
                back_edges.push((j, i));
            }
        }
    }
    let mut in_loop = vec![false; lines.len()];
    for (head, branch) in back_edges {
        let mut seen = vec![false; lines.len()];
        seen[head] = true;
        let mut stack = vec![branch];
        while let Some(n) = stack.pop() {
            if std::mem::replace(&mut seen[n], true) {
                continue;
            }
            stack.extend(preds[n].iter().copied().filter(|&p| !seen[p]));
        }
        for (n, s) in seen.iter().enumerate() {
            in_loop[n] |= *s;
        }
    }
    lines
        .iter()
        .enumerate()
        .filter(|(i, l)| (l.contains(" LDL") || l.contains(" STL")) && in_loop[*i])
        .map(|(_, l)| l.trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::spills_in_loops;

    const LISTING: &str = "        /*0530*/                   STL [R1+0x4], R25 ;
.L_x_6:
        /*0600*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0610*/                   STL [R1], R34 ;
        /*0620*/               @P2 BRA `(.L_x_4) ;
.L_x_4:
        /*0630*/                   BRA `(.L_x_6) ;
        /*0640*/                   LDL.LU R113, [R1+0x4] ;
";

    #[test]
    fn finds_the_spill_inside_the_loop_only() {
        let found = spills_in_loops(LISTING);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("STL [R1], R34"));
    }

    /// An `mbarrier` wait whose retry block ptxas put after the kernel's exit: the epilogue
    /// between the wait and the retry runs once, and its spill is outside every loop.
    const RETRY_AT_THE_END: &str = ".L_x_1:
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R2+URZ], R3 ;
        /*0110*/              @!P0 BRA `(.L_x_9) ;
        /*0120*/                   STL.64 [R1], R40 ;
        /*0130*/                   EXIT ;
.L_x_9:
        /*0140*/                   LDL R5, [R1+0x8] ;
        /*0150*/                   BRA `(.L_x_1) ;
";

    #[test]
    fn the_epilogue_before_a_retry_block_is_not_a_loop() {
        let found = spills_in_loops(RETRY_AT_THE_END);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("LDL R5"));
        // Falling through into the retry block (no exit before it) puts the epilogue back in.
        let through = RETRY_AT_THE_END.replace("EXIT", "NOP");
        assert_eq!(spills_in_loops(&through).len(), 2);
    }

    #[test]
    fn a_listing_without_backward_branches_has_no_loop() {
        let flat = LISTING.replace("BRA `(.L_x_6)", "BRA `(.L_x_4)");
        assert!(spills_in_loops(&flat).is_empty());
    }
}
