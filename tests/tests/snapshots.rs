//! Codegen snapshots for every kernel (its bf16 — or, without a type parameter, its only —
//! 16-byte-aligned variant for sm_90): the tile
//! IR after each compiler stage, the LLVM IR after optimisation and the PTX. Regenerating from
//! the embedded IR must also give exactly the embedded PTX (the build is deterministic and the
//! PTX cache returns what the compiler would produce).

use lexp_compiler::{codegen, ir::parser, passes, target};

fn bf16_aligned(k: &lexp_compiler::launch::KernelInfo) -> &'static lexp_compiler::launch::Variant {
    k.variants
        .iter()
        .find(|v| matches!(v.param("T"), Some("bf16") | None) && v.align == 16)
        .unwrap_or_else(|| panic!("{} has no bf16 aligned variant", k.name))
}

#[test]
fn stages_llvm_ir_and_ptx_of_every_kernel() {
    for k in lexp_kernels::ALL {
        let v = bf16_aligned(k);
        let kernel = parser::parse(v.ir).unwrap_or_else(|e| panic!("{}: {e}", v.symbol));
        let c =
            passes::compile(kernel, &target::SM90).unwrap_or_else(|e| panic!("{}: {e}", v.symbol));
        let stages: String = c
            .stages
            .iter()
            .map(|(name, text)| format!("===== {name}\n{text}\n"))
            .collect();
        insta::assert_snapshot!(format!("{}__stages", k.name), stages);
        let lowered = codegen::lower(&c, &target::SM90, v.symbol)
            .unwrap_or_else(|e| panic!("{}: {e}", v.symbol));
        insta::assert_snapshot!(format!("{}__llvm_ir", k.name), lowered.llvm_ir);
        insta::assert_snapshot!(format!("{}__ptx_sm90", k.name), lowered.ptx);
        assert_eq!(
            lowered.ptx, v.ptx_sm90,
            "{}: regenerated PTX differs from the embedded PTX",
            v.symbol
        );
    }
}

/// Tensor-core kernels use the tensor-core instructions: on sm_80 `mma.sync` fed by `ldmatrix`
/// and `cp.async`; on sm_90 `wgmma` where the accumulator is warpgroup-shaped (8 warps), else
/// `mma.sync`. (The SASS test checks what ptxas makes of them.)
#[test]
fn tensor_core_instructions() {
    let dot_kernels = lexp_kernels::TENSOR_CORE;
    for name in dot_kernels {
        let k = lexp_kernels::find(name).unwrap_or_else(|| panic!("no kernel {name}"));
        for v in k.variants {
            assert!(
                v.ptx_sm80.contains("mma.sync.aligned.m16n8k16.row.col.f32")
                    && v.ptx_sm80.contains("ldmatrix.sync.aligned")
                    && v.ptx_sm80.contains("cp.async.cg.shared.global"),
                "{}: sm_80 PTX without mma.sync/ldmatrix/cp.async",
                v.symbol
            );
            let wgmma = v.ptx_sm90.contains("wgmma.mma_async.sync.aligned");
            let mma = v.ptx_sm90.contains("mma.sync.aligned.m16n8k16");
            assert!(
                wgmma || mma,
                "{}: sm_90 PTX without tensor-core MMA",
                v.symbol
            );
            if v.param("W") == Some("8") && name.starts_with("gemm") {
                assert!(wgmma, "{}: 8-warp GEMM without wgmma on sm_90", v.symbol);
            }
        }
    }
}

/// Structural facts of the PTX that snapshots would only show implicitly.
#[test]
fn ptx_structure() {
    for k in lexp_kernels::ALL {
        for v in k.variants {
            for ptx in [v.ptx_sm80, v.ptx_sm90] {
                assert!(
                    ptx.contains(&format!(".entry {}(", v.symbol)),
                    "{}: no entry",
                    v.symbol
                );
                assert!(!ptx.contains(".local"), "{}: uses local memory", v.symbol);
                assert!(
                    !ptx.contains(".extern .func"),
                    "{}: calls an external function",
                    v.symbol
                );
                assert!(
                    ptx.contains(&format!(".maxntid {}, 1, 1", v.threads)),
                    "{}: no .maxntid",
                    v.symbol
                );
            }
            // Aligned variants move 16 bytes per thread per access on their main tensors
            // (vector loads and stores, or 16-byte `cp.async` copies into shared memory).
            // Gathers of one element per lane have no 16-byte access to make: `transpose_b`
            // and `lora_fold` (LoRA's small `A`s and `B`s, once per step) and
            // `lora_wgrad_reduce` and `lora_wgrad_reduce_many` (its partial sums).
            let gathers = [
                "transpose_b",
                "lora_fold",
                "lora_wgrad_reduce",
                "lora_wgrad_reduce_many",
            ];
            if v.align == 16 && !gathers.contains(&k.name) {
                assert!(
                    v.ptx_sm90.contains(".v4.") || v.ptx_sm90.contains("cp.async.cg.shared.global"),
                    "{}: aligned variant without 16-byte accesses",
                    v.symbol
                );
            }
        }
    }
}

/// Float multiplies feeding adds are contracted into fused multiply-adds (the compiler marks
/// them `contract`, as `nvcc` would fuse them): `axpby`'s `a·x + b·y` and flash attention's
/// `c·s − c·m` (forward) and `c·s − lse2` (backward) are `fma.rn.f32`, one instruction per
/// element where two ran before.
#[test]
fn multiply_adds_are_fused() {
    for name in ["axpby", "flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq"] {
        let k = lexp_kernels::find(name).unwrap_or_else(|| panic!("no kernel {name}"));
        for v in k.variants {
            for ptx in [v.ptx_sm80, v.ptx_sm90] {
                assert!(ptx.contains("fma.rn.f32"), "{}: no fma.rn.f32", v.symbol);
            }
        }
    }
}

/// Variants compiled with `tma = 1`: on sm_90 every TMA loop copies through tensor maps, one
/// 128-byte `grid_constant` parameter per map the variant lists for the runtime, with bulk
/// tensor copies completing on mbarriers; on sm_80 the same variant takes no map and copies with
/// `cp.async`. One TMA GEMM's stages and PTX are snapshots.
#[test]
fn tma_variants() {
    let mut seen = 0;
    for k in lexp_kernels::ALL {
        for v in k.variants.iter().filter(|v| v.param("TMA") == Some("1")) {
            seen += 1;
            let maps = v.ptx_sm90.matches(".param .align 64 .b8").count();
            assert!(maps > 0, "{}: no tensor map parameter", v.symbol);
            assert_eq!(maps, v.tma.len(), "{}: maps listed vs taken", v.symbol);
            for want in [
                "cp.async.bulk.tensor",
                "mbarrier.arrive.expect_tx.shared::cta.b64",
                "mbarrier.try_wait.parity.shared::cta.b64",
                "cvta.param.u64",
            ] {
                assert!(v.ptx_sm90.contains(want), "{}: no `{want}`", v.symbol);
            }
            assert!(
                !v.ptx_sm80.contains("cp.async.bulk") && !v.ptx_sm80.contains("mbarrier"),
                "{}: TMA in the sm_80 PTX",
                v.symbol
            );
        }
        for v in k.variants.iter().filter(|v| v.param("TMA") != Some("1")) {
            assert!(v.tma.is_empty(), "{}: maps without `tma`", v.symbol);
        }
    }
    assert!(seen > 0, "no TMA variant compiled");
    let v = lexp_kernels::gemm_nt::INFO
        .variants
        .iter()
        .find(|v| v.symbol == "gemm_nt_bf16_128_256_64_4_8_8_1_a16")
        .expect("the TMA GEMM variant");
    let c = passes::compile(parser::parse(v.ir).unwrap(), &target::SM90).unwrap();
    let smem = &c.stages.iter().find(|(n, _)| *n == "smem").unwrap().1;
    insta::assert_snapshot!("gemm_nt_tma__smem", smem);
    let lowered = codegen::lower(&c, &target::SM90, v.symbol).unwrap();
    insta::assert_snapshot!("gemm_nt_tma__ptx_sm90", lowered.ptx);
    assert_eq!(lowered.ptx, v.ptx_sm90);
}
