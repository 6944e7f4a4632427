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
    };
    for line in text.lines() {
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
