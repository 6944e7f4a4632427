//! The CPU side of `lexp check` for the tensor-core kernels: dense GEMMs, the block-sparse
//! modes, the sparse MLP operators, fused LoRA and the LoRA branch kernels run in the
//! interpreter (the IR the GPU runs) against
//! `lexp_kernels::reference_matmul`, at one small shape each that crosses tile edges.

use crate::kernel_check::{CheckRow, Rng};
use lexp_compiler::dtype::{round_to, Storage};
use lexp_compiler::interp::HostTensor;
use lexp_compiler::launch::LaunchError;
use lexp_kernels as k;
use lexp_kernels::reference as refr;
use lexp_kernels::reference_matmul as rm;
use lexp_kernels::reference_sparse_mlp::{self as rs, Blocks};

fn t(rng: &mut Rng, dtype: Storage, dims: &[usize]) -> HostTensor {
    HostTensor::new(dtype, dims, &rng.uniform(dims.iter().product(), -1.0, 1.0))
}

fn filled(dtype: Storage, dims: &[usize], v: f32) -> HostTensor {
    HostTensor::new(dtype, dims, &vec![v; dims.iter().product()])
}

fn ints(dims: &[usize], v: &[i32]) -> HostTensor {
    let f: Vec<f32> = v.iter().map(|x| *x as f32).collect();
    HostTensor::new(Storage::I32, dims, &f)
}

fn row(
    kernel: &'static str,
    shape: &str,
    output: &'static str,
    got: &HostTensor,
    want: &[f32],
) -> CheckRow {
    let d = refr::compare(&got.data, want);
    let tol = refr::tolerance(got.dtype);
    CheckRow {
        kernel,
        dtype: got.dtype.name(),
        shape: shape.to_string(),
        variant: "interpreter".into(),
        output,
        rel_l2: d.rel_l2,
        max_abs: d.max_abs,
        tolerance: tol,
        non_finite: d.non_finite,
        pass: d.within(tol),
    }
}

/// Every tensor-core kernel in the interpreter, bf16 and f16.
pub fn check_matmul_host() -> Result<Vec<CheckRow>, LaunchError> {
    let mut rows = vec![];
    let (m, kk, n) = (200usize, 72usize, 136usize);
    for dtype in [Storage::BF16, Storage::F16] {
        let mut rng = Rng::new(5);
        let shape = format!("{m}x{n}x{kk}");
        for (name, ta, tb) in [
            ("gemm_nn", false, false),
            ("gemm_nt", false, true),
            ("gemm_tn", true, false),
        ] {
            let mut a = t(&mut rng, dtype, &if ta { [kk, m] } else { [m, kk] });
            let mut b = t(&mut rng, dtype, &if tb { [n, kk] } else { [kk, n] });
            let mut c = filled(dtype, &[m, n], f32::NAN);
            let want = rm::matmul(&a.data, &b.data, m, kk, n, ta, tb);
            let args = (&mut a, &mut b, &mut c);
            match name {
                "gemm_nn" => k::gemm_nn::interpret(
                    &[],
                    k::gemm_nn::HostArgs {
                        a: args.0,
                        b: args.1,
                        c: args.2,
                    },
                )?,
                "gemm_nt" => k::gemm_nt::interpret(
                    &[],
                    k::gemm_nt::HostArgs {
                        a: args.0,
                        b: args.1,
                        c: args.2,
                    },
                )?,
                _ => k::gemm_tn::interpret(
                    &[],
                    k::gemm_tn::HostArgs {
                        a: args.0,
                        b: args.1,
                        c: args.2,
                    },
                )?,
            }
            rows.push(row(name, &shape, "c", &c, &want));
        }
        // Block-sparse: 2 groups (the second empty), 3 blocks of 64, list bound 2.
        let (bs, nb, max) = (64usize, 3usize, 2usize);
        let (counts, idx) = (vec![2, 0], vec![0, 2, -1, -1]);
        let groups = m.div_ceil(128);
        let shape = format!("{m}x{kk} -> {nb}x{bs}");
        let mut x = t(&mut rng, dtype, &[m, kk]);
        let mut w = t(&mut rng, dtype, &[nb * bs, kk]);
        let mut h = filled(dtype, &[m, max * bs], 7.0);
        let want = rm::sparse_out(
            &x.data,
            &w.data,
            m,
            kk,
            nb * bs,
            &counts,
            &idx,
            max,
            128,
            bs,
            &h.data,
        );
        let (mut c, mut i) = (ints(&[groups], &counts), ints(&[groups, max], &idx));
        k::sparse_out::interpret(
            &[("BS", bs)],
            k::sparse_out::HostArgs {
                x: &mut x,
                w: &mut w,
                counts: &mut c,
                indices: &mut i,
                h: &mut h,
            },
        )?;
        rows.push(row("sparse_out", &shape, "h", &h, &want));
        let mut hc = t(&mut rng, dtype, &[m, max * bs]);
        let mut w2 = t(&mut rng, dtype, &[n, nb * bs]);
        let mut y = filled(dtype, &[m, n], f32::NAN);
        let want = rm::sparse_red(
            &hc.data,
            &w2.data,
            m,
            n,
            nb * bs,
            &counts,
            &idx,
            max,
            128,
            bs,
        );
        k::sparse_red::interpret(
            &[("BS", bs)],
            k::sparse_red::HostArgs {
                h: &mut hc,
                w2: &mut w2,
                counts: &mut c,
                indices: &mut i,
                y: &mut y,
            },
        )?;
        rows.push(row("sparse_red", &shape, "y", &y, &want));
        let mut wb = t(&mut rng, dtype, &[nb * bs, nb * bs]);
        let mut o = filled(dtype, &[m, max * bs], 7.0);
        let want = rm::sparse_both(
            &hc.data,
            &wb.data,
            m,
            nb * bs,
            nb * bs,
            &counts,
            &idx,
            max,
            &counts,
            &idx,
            max,
            128,
            bs,
            &o.data,
        );
        let (mut c2, mut i2) = (ints(&[groups], &counts), ints(&[groups, max], &idx));
        k::sparse_both::interpret(
            &[("BS", bs)],
            k::sparse_both::HostArgs {
                h: &mut hc,
                w: &mut wb,
                counts_o: &mut c2,
                indices_o: &mut i2,
                counts_i: &mut c,
                indices_i: &mut i,
                out: &mut o,
            },
        )?;
        rows.push(row("sparse_both", &shape, "out", &o, &want));
        rows.extend(sparse_mlp(&mut rng, dtype, m, kk)?);
        rows.push(select_blocks(&mut rng, dtype)?);
        rows.extend(lora_branch(&mut rng, dtype, (m, kk, n))?);
        // Fused LoRA, rank 16.
        let (r, s) = (16usize, 2.0f32);
        let round = |v: f64| round_to(dtype.dtype(), v as f32);
        let shape = format!("{m}x{kk} -> {n}, r {r}");
        let mut w = t(&mut rng, dtype, &[n, kk]);
        let mut bias = t(&mut rng, dtype, &[n]);
        let mut a = t(&mut rng, dtype, &[r, kk]);
        let mut b = t(&mut rng, dtype, &[n, r]);
        let (mut y, mut xa) = (
            filled(dtype, &[m, n], f32::NAN),
            filled(dtype, &[m, r], f32::NAN),
        );
        k::lora_fwd::interpret(
            &[],
            k::lora_fwd::HostArgs {
                x: &mut x,
                w: &mut w,
                bias: &mut bias,
                a: &mut a,
                b: &mut b,
                s,
                y: &mut y,
                xa: &mut xa,
            },
        )?;
        let (wy, wxa) = rm::lora_fwd(
            &x.data,
            &w.data,
            Some(&bias.data),
            &a.data,
            &b.data,
            s,
            m,
            kk,
            n,
            r,
            round,
        );
        rows.push(row("lora_fwd", &shape, "xa", &xa, &wxa));
        rows.push(row("lora_fwd", &shape, "y", &y, &wy));
        let mut dy = t(&mut rng, dtype, &[m, n]);
        let (mut dx, mut u) = (
            filled(dtype, &[m, kk], f32::NAN),
            filled(dtype, &[m, r], f32::NAN),
        );
        k::lora_bwd_dx::interpret(
            &[],
            k::lora_bwd_dx::HostArgs {
                dy: &mut dy,
                w: &mut w,
                a: &mut a,
                b: &mut b,
                s,
                dx: &mut dx,
                u: &mut u,
            },
        )?;
        let (wdx, wu) = rm::lora_bwd_dx(&dy.data, &w.data, &a.data, &b.data, s, m, kk, n, r, round);
        rows.push(row("lora_bwd_dx", &shape, "u", &u, &wu));
        rows.push(row("lora_bwd_dx", &shape, "dx", &dx, &wdx));
        let mut da = filled(Storage::F32, &[r, kk], 0.0);
        k::lora_grad::interpret(
            &[("BP", 16)],
            k::lora_grad::HostArgs {
                a: &mut u,
                b: &mut x,
                c: &mut da,
            },
        )?;
        rows.push(row(
            "lora_grad",
            &shape,
            "dA",
            &da,
            &rm::lora_grad_a(&u.data, &x.data, m, kk, r),
        ));
        let mut db = filled(Storage::F32, &[n, r], 0.0);
        k::lora_grad::interpret(
            &[("BQ", 16)],
            k::lora_grad::HostArgs {
                a: &mut dy,
                b: &mut xa,
                c: &mut db,
            },
        )?;
        rows.push(row(
            "lora_grad",
            &shape,
            "dB",
            &db,
            &rm::lora_grad_b(&dy.data, &xa.data, m, n, r),
        ));
    }
    Ok(rows)
}

/// The LoRA branch kernels (`lexp_kernels::lora_branch`) chained as the engine runs them, rank
/// 5 (padded to 8): `transpose_b`, `u = x·Aᵀ`, `y += s·u·Bᵀ`, `du = s·dy·B`, `dx += du·A`,
/// `dB += s·dyᵀ·u` and `dA += duᵀ·x` (split over 3 token chunks), outputs poisoned or holding
/// random values the kernels add to.
fn lora_branch(
    rng: &mut Rng,
    dtype: Storage,
    (m, kk, n): (usize, usize, usize),
) -> Result<Vec<CheckRow>, LaunchError> {
    let (r, rp, s) = (5usize, 8usize, 2.0f32);
    let round = |v: f64| round_to(dtype.dtype(), v as f32);
    let shape = format!("{m}x{kk} -> {n}, r {r}");
    let mut rows = vec![];
    let mut x = t(rng, dtype, &[m, kk]);
    let mut a = t(rng, dtype, &[r, kk]);
    let mut b = t(rng, dtype, &[n * r]);
    let mut bt = filled(dtype, &[n * r], f32::NAN);
    k::transpose_b::interpret(
        &[],
        k::transpose_b::HostArgs {
            x: &mut b,
            offs: &mut ints(&[1], &[0]),
            rows: &mut ints(&[1], &[n as i32]),
            r: r as i64,
            y: &mut bt,
        },
    )?;
    let want_bt: Vec<f32> = (0..r * n).map(|i| b.data[(i % n) * r + i / n]).collect();
    rows.push(row("transpose_b", &shape, "bt", &bt, &want_bt));
    // The q/v fold into a projection of `kk` features (sentinel room, two targets).
    let fold = rm::FoldCase::new(kk, r, |n| {
        let v = rng.uniform(n, -1.0, 1.0);
        v.into_iter().map(|x| round_to(dtype.dtype(), x)).collect()
    });
    let (frp, fk, fnn) = fold.dims;
    let (frows, fld) = fold.rows_ld;
    let mut w = HostTensor::new(dtype, &[fold.y0.len()], &fold.y0);
    let want = fold.want(s, round);
    k::lora_fold::interpret(
        &[("RP", frp)],
        k::lora_fold::HostArgs {
            x: &mut HostTensor::new(dtype, &[fold.x.len()], &fold.x),
            offs: &mut ints(&[3, 5], &fold.offs()),
            k: fk as i64,
            n: fnn as i64,
            rows: frows as i64,
            ld: fld as i64,
            s,
            y: &mut w,
        },
    )?;
    rows.push(row("lora_fold", &shape, "w", &w, &want));
    // The fold's reduces in one launch (the q/v layout of four gradients).
    let red = rm::ReduceManyCase::new(kk, r, 3, |n| rng.uniform(n, -1.0, 1.0));
    let (rq, rr, rw, rc) = red.dims;
    let mut g = HostTensor::new(Storage::F32, &[red.g0.len()], &red.g0);
    k::lora_wgrad_reduce_many::interpret(
        &[],
        k::lora_wgrad_reduce_many::HostArgs {
            part: &mut HostTensor::new(Storage::F32, &[red.blocks * rc, rq * rw], &red.part),
            mods: &mut ints(&[4, 5], &red.mods_i32()),
            q: rq as i64,
            r: rr as i64,
            w: rw as i64,
            n: (rq * rr) as i64,
            chunks: rc as i64,
            s,
            acc: 1,
            g: &mut g,
        },
    )?;
    rows.push(row("lora_wgrad_reduce_many", &shape, "g", &g, &red.want(s)));
    let mut bt = HostTensor::new(dtype, &[r, n], &bt.data);
    let down = |x: &mut HostTensor, w: &mut HostTensor, s: f32| {
        let mut u = filled(dtype, &[m, rp], f32::NAN);
        k::lora_down::interpret(&[], k::lora_down::HostArgs { x, w, s, u: &mut u }).map(|_| u)
    };
    let mut u = down(&mut x, &mut a, 1.0)?;
    rows.push(row(
        "lora_down",
        &shape,
        "u",
        &u,
        &rm::lora_down(&x.data, &a.data, 1.0, m, kk, r, rp, round),
    ));
    let mut dy = t(rng, dtype, &[m, n]);
    let mut du = down(&mut dy, &mut bt, s)?;
    rows.push(row(
        "lora_down",
        &shape,
        "du",
        &du,
        &rm::lora_down(&dy.data, &bt.data, s, m, n, r, rp, round),
    ));
    for (out, u, w, s, y) in [
        ("y", &mut u, &mut bt, s, t(rng, dtype, &[m, n])),
        ("dx", &mut du, &mut a, 1.0, t(rng, dtype, &[m, kk])),
    ] {
        let (mut y, y0) = (y.clone(), y);
        let cols = y.dims[1];
        k::lora_expand::interpret(&[], k::lora_expand::HostArgs { u, w, s, y: &mut y })?;
        let want = rm::lora_expand(&y0.data, &u.data, &w.data, s, m, cols, r, rp);
        rows.push(row("lora_expand", &shape, out, &y, &want));
    }
    let compact =
        |v: &HostTensor| -> Vec<f32> { (0..m * r).map(|i| v.data[(i / r) * rp + i % r]).collect() };
    let chunks = 3;
    for (out, a_side, wide, tr, s) in [
        ("dB", &mut u, &mut dy, 0usize, s),
        ("dA", &mut du, &mut x, 1, 1.0),
    ] {
        let q = wide.dims[1];
        let mut part = filled(Storage::F32, &[chunks * q, rp], f32::NAN);
        k::lora_wgrad::interpret(
            &[],
            k::lora_wgrad::HostArgs {
                a: a_side,
                b: wide,
                part: &mut part,
            },
        )?;
        let mut part = HostTensor::new(Storage::F32, &[chunks, q * rp], &part.data);
        let g0 = t(rng, Storage::F32, &[q * r]);
        let mut g = g0.clone();
        k::lora_wgrad_reduce::interpret(
            &[],
            k::lora_wgrad_reduce::HostArgs {
                part: &mut part,
                q: q as i64,
                r: r as i64,
                rp: rp as i64,
                tr: tr as i64,
                s,
                g: &mut g,
            },
        )?;
        let cu = compact(a_side);
        let grad = match tr {
            0 => rm::lora_grad_b(&wide.data, &cu, m, q, r),
            _ => rm::lora_grad_a(&cu, &wide.data, m, q, r),
        };
        let want: Vec<f32> = g0.data.iter().zip(&grad).map(|(g, d)| g + s * d).collect();
        rows.push(row("lora_wgrad", &shape, out, &g, &want));
    }
    // Both passes in one launch (`lora_wgrad_pair`: dB over dy, dA over a second [m, n]
    // input), reduced by `lora_wgrad_reduce_many` writing (`acc = 0`) into NaN gradients.
    let mut x2 = t(rng, dtype, &[m, n]);
    let mut part = filled(Storage::F32, &[2 * chunks * n, rp], f32::NAN);
    k::lora_wgrad_pair::interpret(
        &[],
        k::lora_wgrad_pair::HostArgs {
            a0: &mut u,
            b0: &mut dy,
            a1: &mut du,
            b1: &mut x2,
            part: &mut part,
        },
    )?;
    let mut g = filled(Storage::F32, &[2 * n * r], f32::NAN);
    k::lora_wgrad_reduce_many::interpret(
        &[],
        k::lora_wgrad_reduce_many::HostArgs {
            part: &mut HostTensor::new(Storage::F32, &[2 * chunks, n * rp], &part.data),
            mods: &mut ints(&[2, 5], &rm::PairCase::mods_i32(n, r)),
            q: n as i64,
            r: r as i64,
            w: rp as i64,
            n: (n * r) as i64,
            chunks: chunks as i64,
            s,
            acc: 0,
            g: &mut g,
        },
    )?;
    let want = rm::PairCase::want(
        (&dy.data, &compact(&u)),
        (&compact(&du), &x2.data),
        (m, n, r),
        s,
    );
    rows.push(row("lora_wgrad_pair", &shape, "dB, dA", &g, &want));
    Ok(rows)
}

/// The sparse MLP operators (`sparse_fc1_fwd`, `sparse_fc2_fwd`, `sparse_fc2_dh`,
/// `sparse_fc1_dx`) in the
/// interpreter: `m` tokens (2 groups, the second ragged), hidden size `hd`, 3 blocks of 64
/// neurons, list bound 2, group 0 keeping blocks 2 and 0, group 1 keeping block 1.
fn sparse_mlp(
    rng: &mut Rng,
    dtype: Storage,
    m: usize,
    hd: usize,
) -> Result<Vec<CheckRow>, LaunchError> {
    let (bs, nb, max) = (64usize, 3usize, 2usize);
    let f = nb * bs;
    let (counts, idx) = (vec![2, 1], vec![2, 0, 1, -1]);
    let groups = m.div_ceil(128);
    let list = Blocks {
        counts: &counts,
        indices: &idx,
        max_blocks: max,
        bm: 128,
        bs,
    };
    let shape = format!("{m}x{hd} -> {nb}x{bs}");
    let cfg = [("BS", bs)];
    let (mut c, mut i) = (ints(&[groups], &counts), ints(&[groups, max], &idx));
    let mut rows = vec![];
    let mut x = t(rng, dtype, &[m, hd]);
    let mut w1 = t(rng, dtype, &[f, hd]);
    let mut b1 = t(rng, dtype, &[f]);
    let mut h = filled(dtype, &[m, max * bs], 7.0);
    let want = rs::sparse_fc1_fwd(&x.data, &w1.data, &b1.data, (m, hd, f), list, &h.data);
    k::sparse_fc1_fwd::interpret(
        &cfg,
        k::sparse_fc1_fwd::HostArgs {
            x: &mut x,
            w1: &mut w1,
            b1: &mut b1,
            counts: &mut c,
            indices: &mut i,
            h: &mut h,
        },
    )?;
    rows.push(row("sparse_fc1_fwd", &shape, "h", &h, &want));
    let mut w2 = t(rng, dtype, &[hd, f]);
    let mut b2 = t(rng, dtype, &[hd]);
    let mut res = t(rng, dtype, &[m, hd]);
    let mut y = filled(dtype, &[m, hd], f32::NAN);
    let want = rs::sparse_fc2_fwd(&h.data, &w2.data, &b2.data, &res.data, (m, hd, f), list);
    k::sparse_fc2_fwd::interpret(
        &cfg,
        k::sparse_fc2_fwd::HostArgs {
            h: &mut h,
            w2: &mut w2,
            b2: &mut b2,
            res: &mut res,
            counts: &mut c,
            indices: &mut i,
            out: &mut y,
        },
    )?;
    rows.push(row("sparse_fc2_fwd", &shape, "out", &y, &want));
    let mut dy = t(rng, dtype, &[m, hd]);
    let mut w2 = t(rng, dtype, &[hd, f]);
    let mut hr = t(rng, dtype, &[m, max * bs]);
    let mut dh = filled(dtype, &[m, max * bs], 7.0);
    let want = rs::sparse_fc2_dh(&dy.data, &w2.data, &hr.data, (m, hd, f), list, &dh.data);
    k::sparse_fc2_dh::interpret(
        &cfg,
        k::sparse_fc2_dh::HostArgs {
            dy: &mut dy,
            w2: &mut w2,
            h: &mut hr,
            counts: &mut c,
            indices: &mut i,
            dh: &mut dh,
        },
    )?;
    rows.push(row("sparse_fc2_dh", &shape, "dh", &dh, &want));
    let mut dx = filled(dtype, &[m, hd], f32::NAN);
    let want = rs::sparse_fc1_dx(&dh.data, &w1.data, (m, hd, f), list);
    k::sparse_fc1_dx::interpret(
        &cfg,
        k::sparse_fc1_dx::HostArgs {
            dh: &mut dh,
            w1: &mut w1,
            counts: &mut c,
            indices: &mut i,
            dx: &mut dx,
        },
    )?;
    rows.push(row("sparse_fc1_dx", &shape, "dx", &dx, &want));
    let mut db = t(rng, Storage::F32, &[f]);
    let want = rs::sparse_colsum(&dh.data, (m, f), list, &db.data);
    k::sparse_colsum::interpret(
        &cfg,
        k::sparse_colsum::HostArgs {
            dh: &mut dh,
            counts: &mut c,
            indices: &mut i,
            out: &mut db,
        },
    )?;
    rows.push(row("sparse_colsum", &shape, "db1", &db, &want));
    Ok(rows)
}

/// `select_blocks` in the interpreter: 300 tokens (3 groups, the last ragged), 24 blocks, at
/// most 12 per group, lists poisoned; a group passes when `check_selection` accepts it and the
/// slots past its count keep their poison. `rel_l2` is the share of groups that fail.
fn select_blocks(rng: &mut Rng, dtype: Storage) -> Result<CheckRow, LaunchError> {
    let (t, nb, max) = (300usize, 24usize, 12usize);
    let groups = t.div_ceil(128);
    let mut o = HostTensor::new(dtype, &[nb, t], &rng.uniform(nb * t, -4.0, 2.5));
    let bias = rng.uniform(nb, -0.3, 0.3);
    let mut b = HostTensor::new(Storage::F32, &[nb], &bias);
    let mut c = ints(&[groups], &vec![-7; groups]);
    let mut i = ints(&[groups, max], &vec![-9; groups * max]);
    let (scale, target) = (0.7f32, 0.9f32);
    let cfg = lexp_kernels::block_select::select_config(nb)
        .map(|c| c.to_vec())
        .unwrap_or_default();
    k::select_blocks::interpret(
        &cfg,
        k::select_blocks::HostArgs {
            o: &mut o,
            bias: &mut b,
            scale,
            target,
            counts: &mut c,
            indices: &mut i,
        },
    )?;
    let want = lexp_kernels::reference_select::select_blocks(
        &o.data,
        (t, nb),
        &bias,
        scale,
        target,
        max,
        128,
    );
    let ints_of = |t: &HostTensor| t.data.iter().map(|&v| v as i32).collect::<Vec<_>>();
    let failed = lexp_kernels::reference_select::failing_groups(
        &want,
        (&ints_of(&c), &ints_of(&i)),
        (target, max),
        -9,
        1e-4,
    );
    Ok(CheckRow {
        kernel: "select_blocks",
        dtype: dtype.name(),
        shape: format!("{t} tokens, {nb} blocks, at most {max}"),
        variant: "interpreter".into(),
        output: "list",
        rel_l2: failed as f64 / groups as f64,
        max_abs: 0.0,
        tolerance: 0.0,
        non_finite: 0,
        pass: failed == 0,
    })
}
