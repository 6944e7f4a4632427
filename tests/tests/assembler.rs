//! The runtime's ahead-of-load assembler (`lexp_runtime::assembler`): a real kernel's PTX
//! becomes an sm_80 and an sm_90a cubin, the second request is served from the disk cache, and
//! a rejected module reports the target and ptxas's log.

use lexp_runtime::assembler::{AssembleError, Assembler};
use lexp_tests::find_ptxas;

fn assembler(cache: &std::path::Path) -> Assembler {
    let bin = find_ptxas().unwrap_or_else(|| {
        panic!(
            "ptxas not found. Install it with `python3 -m pip install nvidia-cuda-nvcc-cu12` \
             (or set PTXAS=/path/to/ptxas); .ci/run does this."
        )
    });
    Assembler::at(&bin, Some(cache.to_path_buf()))
        .unwrap_or_else(|| panic!("{} does not answer --version", bin.display()))
}

#[test]
fn kernel_ptx_assembles_once_then_comes_from_the_cache() {
    let dir = std::env::temp_dir().join(format!("lexp-cubin-test-{}", std::process::id()));
    let a = assembler(&dir);
    let v = lexp_kernels::gemm_nt::VARIANTS
        .iter()
        .find(|v| v.symbol.contains("bf16"))
        .expect("a bf16 GEMM variant");
    for (ptx, target) in [(v.ptx_sm80, "sm_80"), (v.ptx_sm90, "sm_90a")] {
        let cubin = a.cubin(ptx, target).expect("assembles");
        assert_eq!(&cubin[..4], b"\x7fELF", "{target}: an ELF image");
    }
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
    assert_eq!(files.len(), 2, "one cubin per target in {}", dir.display());
    // The second request reads the cached file (overwritten here to tell it from a new
    // assembly).
    let sm80 = files
        .iter()
        .find(|f| f.file_name().to_string_lossy().starts_with("sm_80-"))
        .expect("the sm_80 cubin");
    std::fs::write(sm80.path(), b"cached").unwrap();
    assert_eq!(a.cubin(v.ptx_sm80, "sm_80").unwrap(), b"cached");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rejected_ptx_names_the_target_and_the_log() {
    let dir = std::env::temp_dir().join(format!("lexp-cubin-bad-{}", std::process::id()));
    let a = assembler(&dir);
    let e = a
        .cubin(
            ".version 8.0\n.target sm_80\n.address_size 64\nnot ptx",
            "sm_80",
        )
        .unwrap_err();
    assert!(e.to_string().contains("sm_80"), "{e}");
    assert!(
        matches!(e, AssembleError::Rejected { ref log, .. } if !log.is_empty()),
        "{e}"
    );
    // Nothing is cached for a failed assembly.
    assert!(std::fs::read_dir(&dir).map_or(true, |d| d.count() == 0));
    let _ = std::fs::remove_dir_all(&dir);
}
