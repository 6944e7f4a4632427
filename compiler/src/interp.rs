//! An interpreter of tile IR on host buffers, with the GPU's numerics: values are rounded to
//! their dtype after every op (16-bit floats compute in f32 and round, as the generated code
//! does), loads and stores round to the storage type, reductions accumulate in f32, and
//! masked-off lanes never touch memory. Unmasked out-of-bounds accesses are errors naming the
//! op, so a kernel bug shows up here before it corrupts GPU memory.

use crate::dtype::{round_to, DType, Storage};
use crate::ir::{BinOp, Block, CmpPred, ConstValue, Kernel, Op, ReduceKind, UnOp, ValueId};
use std::collections::HashMap;
use thiserror::Error;

/// A host buffer standing in for a device tensor. Values are kept as f32 (already rounded to
/// `dtype`); i32 tensors hold exact integers.
#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub dtype: Storage,
    pub data: Vec<f32>,
}

impl Buffer {
    /// A buffer holding `data` rounded to `dtype`.
    pub fn new(dtype: Storage, data: &[f32]) -> Buffer {
        Buffer {
            dtype,
            data: data.iter().map(|x| round_to(dtype.dtype(), *x)).collect(),
        }
    }
}

/// A kernel argument for the interpreter, in the kernel's argument order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum InterpArg {
    /// Base pointer: index of a buffer.
    Ptr(usize),
    I64(i64),
    I32(i32),
    F32(f32),
}

/// Why interpretation failed.
#[derive(Debug, Error, PartialEq)]
pub enum InterpError {
    #[error("kernel `{kernel}`: {msg}")]
    Kernel { kernel: String, msg: String },
}

#[derive(Clone, Debug)]
enum Data {
    F(Vec<f32>),
    I(Vec<i64>),
    P(usize, Vec<i64>),
}

#[derive(Clone, Debug)]
struct Tile {
    shape: Vec<usize>,
    dtype: DType,
    data: Data,
}

impl Tile {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn f(&self) -> &[f32] {
        match &self.data {
            Data::F(v) => v,
            _ => &[],
        }
    }
    fn i(&self) -> &[i64] {
        match &self.data {
            Data::I(v) => v,
            _ => &[],
        }
    }
}

enum Flow {
    Next,
    Yield(Vec<Tile>),
    Return,
}

struct Ctx<'a> {
    k: &'a Kernel,
    pid: [usize; 3],
    env: HashMap<ValueId, Tile>,
    bufs: &'a mut [Buffer],
}

/// Runs every program of `grid` in order (x fastest).
pub fn run(
    k: &Kernel,
    grid: [usize; 3],
    args: &[InterpArg],
    bufs: &mut [Buffer],
) -> Result<(), InterpError> {
    let fail = |msg: String| InterpError::Kernel {
        kernel: k.name.clone(),
        msg,
    };
    if args.len() != k.args.len() {
        return Err(fail(format!(
            "{} arguments given, {} expected",
            args.len(),
            k.args.len()
        )));
    }
    let mut base = HashMap::new();
    for (a, v) in k.args.iter().zip(args) {
        let dtype = k.ty(a.value).dtype;
        let t = match (dtype, v) {
            (DType::Ptr(_), InterpArg::Ptr(b)) => {
                if *b >= bufs.len() {
                    return Err(fail(format!("argument `{}`: no buffer {b}", a.name)));
                }
                Tile {
                    shape: vec![],
                    dtype,
                    data: Data::P(*b, vec![0]),
                }
            }
            (DType::I64, InterpArg::I64(x)) => Tile {
                shape: vec![],
                dtype,
                data: Data::I(vec![*x]),
            },
            (DType::I32, InterpArg::I32(x)) => Tile {
                shape: vec![],
                dtype,
                data: Data::I(vec![*x as i64]),
            },
            (DType::F32, InterpArg::F32(x)) => Tile {
                shape: vec![],
                dtype,
                data: Data::F(vec![*x]),
            },
            _ => {
                return Err(fail(format!(
                    "argument `{}`: expected {dtype}, got {v:?}",
                    a.name
                )))
            }
        };
        base.insert(a.value, t);
    }
    for z in 0..grid[2] {
        for y in 0..grid[1] {
            for x in 0..grid[0] {
                let mut cx = Ctx {
                    k,
                    pid: [x, y, z],
                    env: base.clone(),
                    bufs,
                };
                cx.block(&k.body).map_err(fail)?;
            }
        }
    }
    Ok(())
}

fn wrap(dtype: DType, x: i64) -> i64 {
    match dtype {
        DType::I1 => (x != 0) as i64,
        DType::I32 => x as i32 as i64,
        _ => x,
    }
}

impl Ctx<'_> {
    fn get(&self, v: ValueId) -> Result<&Tile, String> {
        self.env
            .get(&v)
            .ok_or_else(|| format!("value #{} used before definition", v.0))
    }

    fn block(&mut self, b: &Block) -> Result<Flow, String> {
        for inst in &b.insts {
            match &inst.op {
                Op::Yield { values } => {
                    return Ok(Flow::Yield(
                        values
                            .iter()
                            .map(|v| self.get(*v).cloned())
                            .collect::<Result<_, _>>()?,
                    ))
                }
                Op::Return => return Ok(Flow::Return),
                Op::For {
                    lo,
                    hi,
                    step,
                    inits,
                    body,
                } => {
                    let (lo, hi, step) = (
                        self.get(*lo)?.i()[0],
                        self.get(*hi)?.i()[0],
                        self.get(*step)?.i()[0],
                    );
                    if step <= 0 {
                        return Err(format!("`for` with step {step}"));
                    }
                    let ivt = self.k.ty(body.args[0]).dtype;
                    let mut carried: Vec<Tile> = inits
                        .iter()
                        .map(|v| self.get(*v).cloned())
                        .collect::<Result<_, _>>()?;
                    let mut i = lo;
                    while i < hi {
                        self.env.insert(
                            body.args[0],
                            Tile {
                                shape: vec![],
                                dtype: ivt,
                                data: Data::I(vec![i]),
                            },
                        );
                        for (a, t) in body.args[1..].iter().zip(&carried) {
                            self.env.insert(*a, t.clone());
                        }
                        match self.block(body)? {
                            Flow::Yield(v) => carried = v,
                            Flow::Return => return Ok(Flow::Return),
                            Flow::Next => {}
                        }
                        i += step;
                    }
                    for (r, t) in inst.results.iter().zip(carried) {
                        self.env.insert(*r, t);
                    }
                }
                Op::If {
                    cond,
                    then_block,
                    else_block,
                } => {
                    let c = self.get(*cond)?.i()[0] != 0;
                    match self.block(if c { then_block } else { else_block })? {
                        Flow::Yield(v) => {
                            for (r, t) in inst.results.iter().zip(v) {
                                self.env.insert(*r, t);
                            }
                        }
                        Flow::Return => return Ok(Flow::Return),
                        Flow::Next => {}
                    }
                }
                op => {
                    let r = inst.results.first().copied();
                    if let Some(t) = self.op(op, r)? {
                        if let Some(r) = r {
                            self.env.insert(r, t);
                        }
                    }
                }
            }
        }
        Ok(Flow::Next)
    }

    fn result_ty(&self, r: Option<ValueId>) -> Result<(DType, Vec<usize>), String> {
        let r = r.ok_or("op without result")?;
        let t = self.k.ty(r);
        Ok((t.dtype, t.shape.clone()))
    }

    fn op(&mut self, op: &Op, r: Option<ValueId>) -> Result<Option<Tile>, String> {
        let mk = |dtype: DType, shape: Vec<usize>, data: Data| Some(Tile { shape, dtype, data });
        Ok(match op {
            Op::ProgramId { axis } => mk(
                DType::I32,
                vec![],
                Data::I(vec![self.pid[*axis as usize] as i64]),
            ),
            Op::Const { value } => {
                let (dtype, shape) = self.result_ty(r)?;
                let n: usize = shape.iter().product();
                let data = if dtype.is_float() {
                    Data::F(vec![round_to(dtype, value.as_f64() as f32); n])
                } else {
                    let i = match value {
                        ConstValue::Int(i) => *i,
                        ConstValue::Float(x) => *x as i64,
                    };
                    Data::I(vec![wrap(dtype, i); n])
                };
                mk(dtype, shape, data)
            }
            Op::Range { n } => mk(DType::I32, vec![*n], Data::I((0..*n as i64).collect())),
            Op::ConvertLayout { src } => Some(self.get(*src)?.clone()),
            Op::Splat { src } | Op::Broadcast { src } | Op::ExpandDims { src, .. } => {
                let (dtype, shape) = self.result_ty(r)?;
                let s = self.get(*src)?.clone();
                let is_expand = matches!(op, Op::ExpandDims { .. });
                let n: usize = shape.iter().product();
                let idx: Vec<usize> = if is_expand || s.shape.is_empty() {
                    (0..n)
                        .map(|i| if s.shape.is_empty() { 0 } else { i })
                        .collect()
                } else {
                    (0..n)
                        .map(|i| broadcast_index(i, &shape, &s.shape))
                        .collect()
                };
                let data = match &s.data {
                    Data::F(v) => Data::F(idx.iter().map(|i| v[*i]).collect()),
                    Data::I(v) => Data::I(idx.iter().map(|i| v[*i]).collect()),
                    Data::P(b, v) => Data::P(*b, idx.iter().map(|i| v[*i]).collect()),
                };
                mk(dtype, shape, data)
            }
            Op::Binary { op, lhs, rhs } => {
                let (a, b) = (self.get(*lhs)?, self.get(*rhs)?);
                let dt = a.dtype;
                let data = if dt.is_float() {
                    Data::F(
                        a.f()
                            .iter()
                            .zip(b.f())
                            .map(|(x, y)| round_to(dt, fbin(*op, *x, *y)))
                            .collect(),
                    )
                } else {
                    let v = a
                        .i()
                        .iter()
                        .zip(b.i())
                        .map(|(x, y)| ibin(*op, *x, *y).map(|z| wrap(dt, z)))
                        .collect::<Result<_, _>>()?;
                    Data::I(v)
                };
                mk(dt, a.shape.clone(), data)
            }
            Op::Cmp { pred, lhs, rhs } => {
                let (a, b) = (self.get(*lhs)?, self.get(*rhs)?);
                let v: Vec<i64> = if a.dtype.is_float() {
                    a.f()
                        .iter()
                        .zip(b.f())
                        .map(|(x, y)| cmp(*pred, *x as f64, *y as f64) as i64)
                        .collect()
                } else {
                    a.i()
                        .iter()
                        .zip(b.i())
                        .map(|(x, y)| cmp(*pred, *x as f64, *y as f64) as i64)
                        .collect()
                };
                mk(DType::I1, a.shape.clone(), Data::I(v))
            }
            Op::Unary { op, src } => {
                let a = self.get(*src)?;
                let dt = a.dtype;
                let data = if dt.is_float() {
                    Data::F(
                        a.f()
                            .iter()
                            .map(|x| round_to(dt, funary(*op, *x)))
                            .collect(),
                    )
                } else {
                    Data::I(
                        a.i()
                            .iter()
                            .map(|x| match op {
                                UnOp::Neg => wrap(dt, x.wrapping_neg()),
                                UnOp::Not => (*x == 0) as i64,
                                _ => wrap(dt, x.wrapping_abs()),
                            })
                            .collect(),
                    )
                };
                mk(dt, a.shape.clone(), data)
            }
            Op::Select { cond, a, b } => {
                let (c, x, y) = (self.get(*cond)?, self.get(*a)?, self.get(*b)?);
                let data = match (&x.data, &y.data) {
                    (Data::F(p), Data::F(q)) => Data::F(
                        c.i()
                            .iter()
                            .enumerate()
                            .map(|(i, c)| if *c != 0 { p[i] } else { q[i] })
                            .collect(),
                    ),
                    (Data::I(p), Data::I(q)) => Data::I(
                        c.i()
                            .iter()
                            .enumerate()
                            .map(|(i, c)| if *c != 0 { p[i] } else { q[i] })
                            .collect(),
                    ),
                    _ => return Err("select on pointers".into()),
                };
                mk(x.dtype, x.shape.clone(), data)
            }
            Op::Cast { src } => {
                let (dtype, shape) = self.result_ty(r)?;
                let a = self.get(*src)?;
                let data = match (&a.data, dtype.is_float()) {
                    (Data::F(v), true) => Data::F(v.iter().map(|x| round_to(dtype, *x)).collect()),
                    (Data::I(v), true) => {
                        Data::F(v.iter().map(|x| round_to(dtype, *x as f32)).collect())
                    }
                    (Data::F(v), false) => Data::I(
                        v.iter()
                            .map(|x| {
                                if dtype == DType::I1 {
                                    (*x != 0.0) as i64
                                } else {
                                    wrap(dtype, *x as i64)
                                }
                            })
                            .collect(),
                    ),
                    (Data::I(v), false) => Data::I(v.iter().map(|x| wrap(dtype, *x)).collect()),
                    _ => return Err("cast of a pointer".into()),
                };
                mk(dtype, shape, data)
            }
            Op::AddPtr { ptr, offset } => {
                let (p, o) = (self.get(*ptr)?, self.get(*offset)?);
                let Data::P(b, base) = &p.data else {
                    return Err("addptr on a non-pointer".into());
                };
                let v = base.iter().zip(o.i()).map(|(x, y)| x + y).collect();
                mk(p.dtype, p.shape.clone(), Data::P(*b, v))
            }
            Op::Load { ptr, mask, other } => {
                let (dtype, shape) = self.result_ty(r)?;
                let p = self.get(*ptr)?.clone();
                let m = match mask {
                    Some(m) => Some(self.get(*m)?.i().to_vec()),
                    None => None,
                };
                let o = match other {
                    Some(o) => Some(self.get(*o)?.clone()),
                    None => None,
                };
                let Data::P(b, offs) = &p.data else {
                    return Err("load through a non-pointer".into());
                };
                let buf = &self.bufs[*b];
                let mut out = Vec::with_capacity(p.numel());
                for (i, off) in offs.iter().enumerate() {
                    let on = m.as_ref().map(|m| m[i] != 0).unwrap_or(true);
                    if on {
                        let x = usize::try_from(*off)
                            .ok()
                            .and_then(|o| buf.data.get(o))
                            .ok_or_else(|| {
                                format!(
                                    "load out of bounds: element {off} of a buffer of {}",
                                    buf.data.len()
                                )
                            })?;
                        out.push(*x as f64);
                    } else {
                        out.push(match &o {
                            Some(t) => match &t.data {
                                Data::F(v) => v[i] as f64,
                                Data::I(v) => v[i] as f64,
                                _ => 0.0,
                            },
                            None => 0.0,
                        });
                    }
                }
                let data = if dtype.is_float() {
                    Data::F(out.iter().map(|x| round_to(dtype, *x as f32)).collect())
                } else {
                    Data::I(out.iter().map(|x| *x as i64).collect())
                };
                mk(dtype, shape, data)
            }
            Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } => {
                let atomic = matches!(op, Op::AtomicAdd { .. });
                let p = self.get(*ptr)?.clone();
                let v = self.get(*value)?.clone();
                let m = match mask {
                    Some(m) => Some(self.get(*m)?.i().to_vec()),
                    None => None,
                };
                let Data::P(b, offs) = &p.data else {
                    return Err("store through a non-pointer".into());
                };
                let buf = &mut self.bufs[*b];
                let st = buf.dtype.dtype();
                for (i, off) in offs.iter().enumerate() {
                    if !m.as_ref().map(|m| m[i] != 0).unwrap_or(true) {
                        continue;
                    }
                    let n = buf.data.len();
                    let slot = usize::try_from(*off)
                        .ok()
                        .and_then(|o| buf.data.get_mut(o))
                        .ok_or_else(|| {
                            format!("store out of bounds: element {off} of a buffer of {n}")
                        })?;
                    let x = match &v.data {
                        Data::F(d) => d[i],
                        Data::I(d) => d[i] as f32,
                        _ => return Err("storing a pointer".into()),
                    };
                    *slot = if atomic {
                        round_to(st, *slot + x)
                    } else {
                        round_to(st, x)
                    };
                }
                None
            }
            Op::Trans { src } => {
                let (dtype, shape) = self.result_ty(r)?;
                let a = self.get(*src)?;
                let (rows, cols) = (a.shape[0], a.shape[1]);
                let at = |i: usize| (i % rows) * cols + i / rows;
                let data = match &a.data {
                    Data::F(v) => Data::F((0..rows * cols).map(|i| v[at(i)]).collect()),
                    Data::I(v) => Data::I((0..rows * cols).map(|i| v[at(i)]).collect()),
                    _ => return Err("transposing a pointer tile".into()),
                };
                mk(dtype, shape, data)
            }
            Op::Dot { a, b, acc } => {
                // Products of 16-bit values are exact in f32; the tensor core sums them in f32
                // (in an order of its own), which the f64-free emulation here matches to within
                // the tolerance the tests use.
                let (dtype, shape) = self.result_ty(r)?;
                let (x, y, c) = (self.get(*a)?, self.get(*b)?, self.get(*acc)?);
                let (m, k, n) = (x.shape[0], x.shape[1], y.shape[1]);
                let (Data::F(x), Data::F(y), Data::F(c)) = (&x.data, &y.data, &c.data) else {
                    return Err("dot needs float operands".into());
                };
                let mut out = c.clone();
                for i in 0..m {
                    for j in 0..n {
                        let mut s = 0f32;
                        for l in 0..k {
                            s += x[i * k + l] * y[l * n + j];
                        }
                        out[i * n + j] += s;
                    }
                }
                mk(dtype, shape, Data::F(out))
            }
            Op::Reduce { src, axis, kind } => {
                let (dtype, shape) = self.result_ty(r)?;
                let a = self.get(*src)?;
                let (outer, n, inner) = (
                    a.shape[..*axis].iter().product::<usize>(),
                    a.shape[*axis],
                    a.shape[*axis + 1..].iter().product::<usize>(),
                );
                let get = |i: usize| -> f64 {
                    match &a.data {
                        Data::F(v) => v[i] as f64,
                        Data::I(v) => v[i] as f64,
                        _ => 0.0,
                    }
                };
                let mut out = vec![];
                for o in 0..outer {
                    for i in 0..inner {
                        let mut acc: Option<f64> = None;
                        for j in 0..n {
                            let x = get((o * n + j) * inner + i);
                            acc = Some(match (acc, kind) {
                                (None, _) => x,
                                (Some(s), ReduceKind::Sum) if dtype.is_float() => {
                                    (s as f32 + x as f32) as f64
                                }
                                (Some(s), ReduceKind::Sum) => {
                                    wrap(dtype, s as i64 + x as i64) as f64
                                }
                                (Some(s), ReduceKind::Max) => {
                                    fbin(BinOp::Max, s as f32, x as f32) as f64
                                }
                                (Some(s), ReduceKind::Min) => {
                                    fbin(BinOp::Min, s as f32, x as f32) as f64
                                }
                            });
                        }
                        out.push(acc.unwrap_or(0.0));
                    }
                }
                let data = if dtype.is_float() {
                    Data::F(out.iter().map(|x| *x as f32).collect())
                } else {
                    Data::I(out.iter().map(|x| *x as i64).collect())
                };
                mk(dtype, shape, data)
            }
            Op::For { .. } | Op::If { .. } | Op::Yield { .. } | Op::Return => {
                return Err("control flow in op()".into())
            }
        })
    }
}

fn broadcast_index(i: usize, shape: &[usize], src: &[usize]) -> usize {
    let mut rem = i;
    let mut idx = 0;
    let mut stride = 1;
    let mut coords = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        coords[d] = rem % shape[d];
        rem /= shape[d];
    }
    for d in (0..shape.len()).rev() {
        let c = if src[d] == 1 { 0 } else { coords[d] };
        idx += c * stride;
        stride *= src[d];
    }
    idx
}

fn fbin(op: BinOp, x: f32, y: f32) -> f32 {
    match op {
        BinOp::Add => x + y,
        BinOp::Sub => x - y,
        BinOp::Mul => x * y,
        BinOp::Div => x / y,
        // maxnum/minnum: a NaN operand yields the other one, as on the GPU.
        BinOp::Max => x.max(y),
        BinOp::Min => x.min(y),
        BinOp::Rem | BinOp::And | BinOp::Or => f32::NAN,
    }
}

fn ibin(op: BinOp, x: i64, y: i64) -> Result<i64, String> {
    Ok(match op {
        BinOp::Add => x.wrapping_add(y),
        BinOp::Sub => x.wrapping_sub(y),
        BinOp::Mul => x.wrapping_mul(y),
        BinOp::Div => {
            if y == 0 {
                return Err("integer division by zero".into());
            } else {
                x.wrapping_div(y)
            }
        }
        BinOp::Rem => {
            if y == 0 {
                return Err("integer remainder by zero".into());
            } else {
                x.wrapping_rem(y)
            }
        }
        BinOp::Max => x.max(y),
        BinOp::Min => x.min(y),
        BinOp::And => x & y,
        BinOp::Or => x | y,
    })
}

fn funary(op: UnOp, x: f32) -> f32 {
    match op {
        UnOp::Neg => -x,
        UnOp::Abs => x.abs(),
        UnOp::Exp => x.exp(),
        UnOp::Exp2 => x.exp2(),
        UnOp::Log => x.ln(),
        UnOp::Log2 => x.log2(),
        UnOp::Sqrt => x.sqrt(),
        UnOp::Rsqrt => 1.0 / x.sqrt(),
        UnOp::Tanh => x.tanh(),
        UnOp::Not => f32::NAN,
    }
}

fn cmp(p: CmpPred, x: f64, y: f64) -> bool {
    match p {
        CmpPred::Lt => x < y,
        CmpPred::Le => x <= y,
        CmpPred::Gt => x > y,
        CmpPred::Ge => x >= y,
        CmpPred::Eq => x == y,
        CmpPred::Ne => x != y,
    }
}

/// A contiguous host tensor, the interpreter's stand-in for a device tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: Storage,
    pub dims: Vec<usize>,
    /// Values (rounded to `dtype`), row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// A tensor of `dims` holding `data` rounded to `dtype`.
    pub fn new(dtype: Storage, dims: &[usize], data: &[f32]) -> HostTensor {
        assert_eq!(
            dims.iter().product::<usize>(),
            data.len(),
            "HostTensor: data does not match dims"
        );
        HostTensor {
            dtype,
            dims: dims.to_vec(),
            data: data.iter().map(|x| round_to(dtype.dtype(), *x)).collect(),
        }
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: Storage, dims: &[usize]) -> HostTensor {
        HostTensor {
            dtype,
            dims: dims.to_vec(),
            data: vec![0.0; dims.iter().product()],
        }
    }

    /// Its description as a (16-byte aligned, contiguous) kernel argument.
    pub fn as_arg(&self) -> crate::launch::TensorArg {
        crate::launch::TensorArg::contiguous(0, self.dtype, &self.dims)
    }
}

impl crate::launch::Dims for HostTensor {
    fn dim(&self, i: usize) -> usize {
        self.dims.get(i).copied().unwrap_or(0)
    }
}

/// Runs a compiled variant's IR on host tensors. `params` follow the kernel's parameter order
/// ([`crate::launch::push_tensor`]) with each tensor's pointer replaced by its index in `tensors`.
pub fn run_variant(
    variant: &crate::launch::Variant,
    grid: [u32; 3],
    params: &[crate::launch::KernelParam],
    tensors: &mut [&mut HostTensor],
) -> Result<(), crate::launch::LaunchError> {
    use crate::launch::{KernelParam, LaunchError};
    let fail = |message: String| LaunchError::Interpreter {
        kernel: variant.kernel,
        message,
    };
    let mut k = crate::ir::parser::parse(variant.ir).map_err(|e| fail(e.0))?;
    crate::passes::canonicalize::canonicalize(&mut k);
    let args: Vec<InterpArg> = params
        .iter()
        .map(|p| match p {
            KernelParam::Ptr(i) => InterpArg::Ptr(*i as usize),
            KernelParam::I64(x) => InterpArg::I64(*x),
            KernelParam::I32(x) => InterpArg::I32(*x),
            KernelParam::F32(x) => InterpArg::F32(*x),
        })
        .collect();
    let mut bufs: Vec<Buffer> = tensors
        .iter_mut()
        .map(|t| Buffer {
            dtype: t.dtype,
            data: std::mem::take(&mut t.data),
        })
        .collect();
    let grid = [grid[0] as usize, grid[1] as usize, grid[2] as usize];
    let r = run(&k, grid, &args, &mut bufs);
    for (t, b) in tensors.iter_mut().zip(bufs) {
        t.data = b.data;
    }
    r.map_err(|e| fail(e.to_string()))
}
