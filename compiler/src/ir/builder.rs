//! Typed construction of tile IR, with the DSL's implicit rules: numpy-style broadcasting
//! (scalars splat, dimensions of extent 1 repeat, missing leading dimensions are added) and
//! dtype promotion (int op float -> float, i32 op i64 -> i64, 16-bit float op f32 -> f32).
//!
//! `#[kernel]` drives this builder while it walks a kernel body; the parser uses [`Builder::push`]
//! directly because IR text spells every type out.

use super::{
    BinOp, Block, CmpPred, ConstValue, Inst, IrError, Kernel, Op, ReduceKind, Type, UnOp, ValueId,
};
use crate::dtype::DType;
use crate::ir_bail;

/// Builds a [`Kernel`], one block at a time.
pub struct Builder {
    kernel: Kernel,
    stack: Vec<Block>,
}

type R<T> = Result<T, IrError>;

/// Largest tile rank the layouts support.
pub const MAX_RANK: usize = 2;
/// Largest number of elements in one tile (a program's registers hold it).
pub const MAX_TILE_ELEMENTS: usize = 1 << 16;

impl Builder {
    /// Starts a kernel with `num_warps` warps per program.
    pub fn new(name: &str, num_warps: usize) -> Builder {
        Builder {
            kernel: Kernel::new(name, num_warps),
            stack: vec![Block::default()],
        }
    }

    /// Sets the pipeline depth for `dot` operands streamed in loops (1: no pipelining).
    pub fn set_stages(&mut self, stages: usize) {
        self.kernel.num_stages = stages.max(1);
    }

    /// Streams `dot` operands with TMA on sm_90a where they qualify ([`Kernel::tma`]).
    pub fn set_tma(&mut self, tma: bool) {
        self.kernel.tma = tma;
    }

    /// Ping-pongs the warpgroups through the MMAs of pipelined loops ([`Kernel::pingpong`]).
    pub fn set_pingpong(&mut self, pingpong: bool) {
        self.kernel.pingpong = pingpong;
    }

    /// Programs per multiprocessor the code must fit ([`Kernel::min_ctas`]).
    pub fn set_min_ctas(&mut self, ctas: usize) {
        self.kernel.min_ctas = ctas.max(1);
    }

    /// Finishes the kernel. Fails if a nested block is still open.
    pub fn finish(mut self) -> R<Kernel> {
        if self.stack.len() != 1 {
            ir_bail!(
                "kernel `{}`: {} unclosed blocks",
                self.kernel.name,
                self.stack.len() - 1
            );
        }
        self.kernel.body = self.stack.pop().unwrap_or_default();
        Ok(self.kernel)
    }

    /// The kernel so far (types of values).
    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }

    /// Type of a value.
    pub fn ty(&self, v: ValueId) -> &Type {
        self.kernel.ty(v)
    }

    /// Adds a kernel argument.
    pub fn arg(&mut self, name: &str, dtype: DType, div: u64) -> ValueId {
        self.kernel.add_arg(name, dtype, div)
    }

    /// Appends an op with results of the given types (no checking).
    pub fn push(&mut self, op: Op, result_types: Vec<Type>) -> Vec<ValueId> {
        let results: Vec<ValueId> = result_types
            .into_iter()
            .map(|t| self.kernel.new_value(t))
            .collect();
        let block = self.stack.last_mut().expect("builder always has a block");
        block.insts.push(Inst {
            results: results.clone(),
            op,
        });
        results
    }

    fn push1(&mut self, op: Op, ty: Type) -> ValueId {
        self.push(op, vec![ty])[0]
    }

    /// Opens a nested block whose arguments have the given types; returns the argument values.
    pub fn begin_block(&mut self, arg_types: &[Type]) -> Vec<ValueId> {
        let args: Vec<ValueId> = arg_types
            .iter()
            .map(|t| self.kernel.new_value(t.clone()))
            .collect();
        self.stack.push(Block {
            args: args.clone(),
            insts: vec![],
        });
        args
    }

    /// Closes the innermost nested block.
    pub fn end_block(&mut self) -> R<Block> {
        if self.stack.len() < 2 {
            ir_bail!("end_block without begin_block");
        }
        Ok(self.stack.pop().unwrap_or_default())
    }

    /// `program_id(axis)`.
    pub fn program_id(&mut self, axis: usize) -> R<ValueId> {
        if axis > 2 {
            ir_bail!("program_id axis must be 0, 1 or 2, got {axis}");
        }
        Ok(self.push1(Op::ProgramId { axis: axis as u8 }, Type::scalar(DType::I32)))
    }

    /// A scalar integer constant.
    pub fn const_int(&mut self, v: i64, dtype: DType) -> ValueId {
        self.push1(
            Op::Const {
                value: ConstValue::Int(v),
            },
            Type::scalar(dtype),
        )
    }

    /// A scalar float constant.
    pub fn const_float(&mut self, v: f64, dtype: DType) -> ValueId {
        self.push1(
            Op::Const {
                value: ConstValue::Float(v),
            },
            Type::scalar(dtype),
        )
    }

    /// A constant tile.
    pub fn full(&mut self, value: ConstValue, ty: Type) -> ValueId {
        self.push1(Op::Const { value }, ty)
    }

    /// `range::<n>()`: `i32[n]` with values 0..n. `n` must be a power of two.
    pub fn range(&mut self, n: usize) -> R<ValueId> {
        if !n.is_power_of_two() {
            ir_bail!("range::<{n}>(): tile extents must be powers of two");
        }
        if n > MAX_TILE_ELEMENTS {
            ir_bail!("range::<{n}>(): tiles have at most {MAX_TILE_ELEMENTS} elements");
        }
        Ok(self.push1(Op::Range { n }, Type::tile(DType::I32, &[n])))
    }

    /// Broadcasts `v` to `shape` (scalar splat, leading dims added, extent-1 dims repeated).
    pub fn broadcast_to(&mut self, v: ValueId, shape: &[usize]) -> R<ValueId> {
        let ty = self.ty(v).clone();
        if ty.shape == shape {
            return Ok(v);
        }
        if ty.shape.is_empty() {
            return Ok(self.push1(Op::Splat { src: v }, Type::tile(ty.dtype, shape)));
        }
        if ty.rank() > shape.len() {
            ir_bail!("cannot broadcast {} to {:?}", ty, shape);
        }
        let mut cur = v;
        let mut cur_shape = ty.shape.clone();
        while cur_shape.len() < shape.len() {
            cur = self.expand_dims(cur, 0)?;
            cur_shape.insert(0, 1);
        }
        for (a, b) in cur_shape.iter().zip(shape) {
            if *a != *b && *a != 1 {
                ir_bail!("cannot broadcast {} to {:?}", ty, shape);
            }
        }
        if cur_shape == shape {
            return Ok(cur);
        }
        Ok(self.push1(Op::Broadcast { src: cur }, Type::tile(ty.dtype, shape)))
    }

    /// The broadcast shape of two shapes (numpy rules).
    pub fn broadcast_shape(a: &[usize], b: &[usize]) -> R<Vec<usize>> {
        let n = a.len().max(b.len());
        let mut out = vec![0; n];
        for i in 0..n {
            let da = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let db = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            out[i] = match (da, db) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => ir_bail!("shapes {:?} and {:?} do not broadcast", a, b),
            };
        }
        if out.iter().product::<usize>() > MAX_TILE_ELEMENTS {
            ir_bail!("broadcasting {:?} with {:?} makes a tile of more than {MAX_TILE_ELEMENTS} elements", a, b);
        }
        Ok(out)
    }

    /// The common dtype of two operands of an arithmetic op.
    pub fn promote(a: DType, b: DType) -> R<DType> {
        use DType::*;
        Ok(match (a, b) {
            (x, y) if x == y => x,
            (I1, _) | (_, I1) => ir_bail!(
                "cannot mix i1 (a mask) with {} in arithmetic",
                if a == I1 { b } else { a }
            ),
            (Ptr(_), _) | (_, Ptr(_)) => ir_bail!("pointers only take `addptr`"),
            (F32, _) | (_, F32) => F32,
            (F16, BF16) | (BF16, F16) => F32,
            (F16, _) | (_, F16) => F16,
            (BF16, _) | (_, BF16) => BF16,
            (I64, _) | (_, I64) => I64,
            _ => I32,
        })
    }

    /// Brings two operands to a common dtype and shape.
    fn unify(&mut self, a: ValueId, b: ValueId) -> R<(ValueId, ValueId)> {
        let (ta, tb) = (self.ty(a).clone(), self.ty(b).clone());
        let dtype = if ta.dtype == tb.dtype {
            ta.dtype
        } else {
            Self::promote(ta.dtype, tb.dtype)?
        };
        let shape = Self::broadcast_shape(&ta.shape, &tb.shape)?;
        let a = self.cast(a, dtype)?;
        let b = self.cast(b, dtype)?;
        Ok((self.broadcast_to(a, &shape)?, self.broadcast_to(b, &shape)?))
    }

    /// Element-wise binary op with broadcasting and promotion.
    pub fn binary(&mut self, op: BinOp, a: ValueId, b: ValueId) -> R<ValueId> {
        let (a, b) = self.unify(a, b)?;
        let ty = self.ty(a).clone();
        match op {
            BinOp::And | BinOp::Or if !ty.dtype.is_int() => {
                ir_bail!("`&`/`|` need masks or integers, got {}", ty)
            }
            BinOp::Rem if !ty.dtype.is_int() => ir_bail!("`%` needs integers, got {}", ty),
            _ => {}
        }
        Ok(self.push1(Op::Binary { op, lhs: a, rhs: b }, ty))
    }

    /// Comparison with broadcasting and promotion; the result is i1.
    pub fn cmp(&mut self, pred: CmpPred, a: ValueId, b: ValueId) -> R<ValueId> {
        let (a, b) = self.unify(a, b)?;
        let ty = self.ty(a).with_dtype(DType::I1);
        Ok(self.push1(
            Op::Cmp {
                pred,
                lhs: a,
                rhs: b,
            },
            ty,
        ))
    }

    /// Element-wise unary op. Transcendentals need floats; `Not` needs i1.
    pub fn unary(&mut self, op: UnOp, a: ValueId) -> R<ValueId> {
        let ty = self.ty(a).clone();
        match op {
            UnOp::Not if ty.dtype != DType::I1 => ir_bail!("`!` needs a mask (i1), got {}", ty),
            UnOp::Neg | UnOp::Abs
                if !(ty.dtype.is_float() || matches!(ty.dtype, DType::I32 | DType::I64)) =>
            {
                ir_bail!("{:?} needs a number, got {}", op, ty)
            }
            UnOp::Exp
            | UnOp::Exp2
            | UnOp::Log
            | UnOp::Log2
            | UnOp::Sqrt
            | UnOp::Rsqrt
            | UnOp::Tanh
                if !ty.dtype.is_float() =>
            {
                ir_bail!("{:?} needs a float tile, got {} (cast it first)", op, ty)
            }
            _ => {}
        }
        Ok(self.push1(Op::Unary { op, src: a }, ty))
    }

    /// `cond ? a : b` with broadcasting of all three.
    pub fn select(&mut self, cond: ValueId, a: ValueId, b: ValueId) -> R<ValueId> {
        if self.ty(cond).dtype != DType::I1 {
            ir_bail!(
                "select condition must be a mask (i1), got {}",
                self.ty(cond)
            );
        }
        let (a, b) = self.unify(a, b)?;
        let shape = Self::broadcast_shape(&self.ty(cond).shape.clone(), &self.ty(a).shape.clone())?;
        let cond = self.broadcast_to(cond, &shape)?;
        let a = self.broadcast_to(a, &shape)?;
        let b = self.broadcast_to(b, &shape)?;
        let ty = self.ty(a).clone();
        Ok(self.push1(Op::Select { cond, a, b }, ty))
    }

    /// Converts to `dtype` (no-op when equal).
    pub fn cast(&mut self, v: ValueId, dtype: DType) -> R<ValueId> {
        let ty = self.ty(v).clone();
        if ty.dtype == dtype {
            return Ok(v);
        }
        if matches!(ty.dtype, DType::Ptr(_)) || matches!(dtype, DType::Ptr(_)) {
            ir_bail!("cannot cast {} to {}", ty, dtype);
        }
        Ok(self.push1(Op::Cast { src: v }, ty.with_dtype(dtype)))
    }

    /// Inserts an extent-1 dimension at `axis`.
    pub fn expand_dims(&mut self, v: ValueId, axis: usize) -> R<ValueId> {
        let ty = self.ty(v).clone();
        if axis > ty.rank() {
            ir_bail!("expand_dims axis {axis} out of range for {}", ty);
        }
        if ty.rank() >= MAX_RANK {
            ir_bail!(
                "tiles have at most {MAX_RANK} dimensions; expanding {} would make {}",
                ty,
                ty.rank() + 1
            );
        }
        let mut shape = ty.shape.clone();
        shape.insert(axis, 1);
        Ok(self.push1(
            Op::ExpandDims { src: v, axis },
            Type::tile(ty.dtype, &shape),
        ))
    }

    /// Swaps the dimensions of a rank-2 tile.
    pub fn trans(&mut self, v: ValueId) -> R<ValueId> {
        let ty = self.ty(v).clone();
        if ty.rank() != 2 {
            ir_bail!("trans needs a rank-2 tile, got {}", ty);
        }
        let shape = [ty.shape[1], ty.shape[0]];
        Ok(self.push1(Op::Trans { src: v }, Type::tile(ty.dtype, &shape)))
    }

    /// `acc + a · b` on tensor cores: `a: [M, K]` and `b: [K, N]` of one 16-bit float type,
    /// `acc: [M, N]` f32 (an f32 scalar is splatted). `M` must be a multiple of 16, `N` of 8 and
    /// `K` of 16 (the `m16n8k16` instruction shape).
    pub fn dot(&mut self, a: ValueId, b: ValueId, acc: ValueId) -> R<ValueId> {
        let (ta, tb) = (self.ty(a).clone(), self.ty(b).clone());
        if ta.rank() != 2 || tb.rank() != 2 {
            ir_bail!("dot needs rank-2 operands, got {} and {}", ta, tb);
        }
        if ta.dtype != tb.dtype || !matches!(ta.dtype, DType::BF16 | DType::F16) {
            ir_bail!(
                "dot needs bf16 or f16 operands of one type, got {} and {}",
                ta,
                tb
            );
        }
        let (m, k, n) = (ta.shape[0], ta.shape[1], tb.shape[1]);
        if tb.shape[0] != k {
            ir_bail!(
                "dot: inner dimensions differ ({} · {}); transpose one operand with `.t()`",
                ta,
                tb
            );
        }
        if m % 16 != 0 || n % 8 != 0 || k % 16 != 0 {
            ir_bail!(
                "dot [{m}, {k}] · [{k}, {n}]: M must be a multiple of 16, N of 8 and K of 16 (the tensor-core instruction is m16n8k16)"
            );
        }
        let acc = self.broadcast_to(acc, &[m, n])?;
        let tacc = self.ty(acc).clone();
        if tacc.dtype != DType::F32 {
            ir_bail!("dot accumulates in f32, got an accumulator {}", tacc);
        }
        Ok(self.push1(Op::Dot { a, b, acc }, Type::tile(DType::F32, &[m, n])))
    }

    /// Reduces along `axis` (sum in the input dtype; 16-bit floats are reduced in f32).
    pub fn reduce(&mut self, v: ValueId, axis: usize, kind: ReduceKind) -> R<ValueId> {
        let ty = self.ty(v).clone();
        if axis >= ty.rank() {
            ir_bail!("reduce axis {axis} out of range for {}", ty);
        }
        if !(ty.dtype.is_float() || matches!(ty.dtype, DType::I32)) {
            ir_bail!("reduce needs f32/f16/bf16/i32, got {}", ty);
        }
        let v = if matches!(ty.dtype, DType::F16 | DType::BF16) {
            self.cast(v, DType::F32)?
        } else {
            v
        };
        let mut shape = ty.shape.clone();
        shape.remove(axis);
        let dtype = self.ty(v).dtype;
        Ok(self.push1(Op::Reduce { src: v, axis, kind }, Type::tile(dtype, &shape)))
    }

    /// Pointer plus element offsets; the pointer is splatted to the offsets' shape.
    pub fn addptr(&mut self, ptr: ValueId, offset: ValueId) -> R<ValueId> {
        let pty = self.ty(ptr).clone();
        if !matches!(pty.dtype, DType::Ptr(_)) {
            ir_bail!("addptr needs a pointer, got {}", pty);
        }
        let oty = self.ty(offset).clone();
        if !matches!(oty.dtype, DType::I32 | DType::I64) {
            ir_bail!("pointer offsets must be i32 or i64, got {}", oty);
        }
        let shape = Self::broadcast_shape(&pty.shape, &oty.shape)?;
        let ptr = self.broadcast_to(ptr, &shape)?;
        let offset = self.broadcast_to(offset, &shape)?;
        Ok(self.push1(Op::AddPtr { ptr, offset }, Type::tile(pty.dtype, &shape)))
    }

    fn check_mask(&mut self, mask: Option<ValueId>, shape: &[usize]) -> R<Option<ValueId>> {
        match mask {
            None => Ok(None),
            Some(m) => {
                if self.ty(m).dtype != DType::I1 {
                    ir_bail!("mask must be i1, got {}", self.ty(m));
                }
                Ok(Some(self.broadcast_to(m, shape)?))
            }
        }
    }

    /// Masked load; masked-off elements become `other` (cast and broadcast to the element type).
    pub fn load(
        &mut self,
        ptr: ValueId,
        mask: Option<ValueId>,
        other: Option<ValueId>,
    ) -> R<ValueId> {
        let pty = self.ty(ptr).clone();
        let DType::Ptr(st) = pty.dtype else {
            ir_bail!("load needs a pointer tile, got {}", pty)
        };
        let mask = self.check_mask(mask, &pty.shape)?;
        let other = match other {
            None => None,
            Some(o) => {
                let o = self.cast(o, st.dtype())?;
                Some(self.broadcast_to(o, &pty.shape)?)
            }
        };
        Ok(self.push1(
            Op::Load { ptr, mask, other },
            Type {
                dtype: st.dtype(),
                shape: pty.shape,
            },
        ))
    }

    fn store_like(
        &mut self,
        ptr: ValueId,
        value: ValueId,
        mask: Option<ValueId>,
        atomic: bool,
    ) -> R<()> {
        let pty = self.ty(ptr).clone();
        let DType::Ptr(st) = pty.dtype else {
            ir_bail!("store needs a pointer tile, got {}", pty)
        };
        if atomic && st.dtype() != DType::F32 {
            ir_bail!("atomic_add needs an f32 tensor, got {}", st.name());
        }
        let vty = self.ty(value).dtype;
        if vty != st.dtype() && !(vty.is_float() && st.dtype().is_float()) {
            ir_bail!(
                "cannot store {} into a {} tensor",
                self.ty(value),
                st.name()
            );
        }
        let value = self.cast(value, st.dtype())?;
        let value = self.broadcast_to(value, &pty.shape)?;
        let mask = self.check_mask(mask, &pty.shape)?;
        let op = if atomic {
            Op::AtomicAdd { ptr, value, mask }
        } else {
            Op::Store { ptr, value, mask }
        };
        self.push(op, vec![]);
        Ok(())
    }

    /// Masked store (the value is cast to the tensor's element type).
    pub fn store(&mut self, ptr: ValueId, value: ValueId, mask: Option<ValueId>) -> R<()> {
        self.store_like(ptr, value, mask, false)
    }

    /// Masked atomic add into an f32 tensor.
    pub fn atomic_add(&mut self, ptr: ValueId, value: ValueId, mask: Option<ValueId>) -> R<()> {
        self.store_like(ptr, value, mask, true)
    }

    /// Whether the block being built ends in `return` (nothing after it can run).
    pub fn ends_with_return(&self) -> bool {
        matches!(
            self.stack
                .last()
                .and_then(|b| b.insts.last())
                .map(|i| &i.op),
            Some(Op::Return)
        )
    }

    /// Ends the current block with a `yield`.
    pub fn yield_(&mut self, values: Vec<ValueId>) {
        self.push(Op::Yield { values }, vec![]);
    }

    /// Early return.
    pub fn ret(&mut self) {
        self.push(Op::Return, vec![]);
    }

    /// Appends a `for` whose body was built between `begin_block` and `end_block`; returns the
    /// loop's results (types of the carried values).
    pub fn for_loop(
        &mut self,
        lo: ValueId,
        hi: ValueId,
        step: ValueId,
        inits: Vec<ValueId>,
        body: Block,
    ) -> R<Vec<ValueId>> {
        let types: Vec<Type> = inits.iter().map(|v| self.ty(*v).clone()).collect();
        for (i, v) in [lo, hi, step].iter().enumerate() {
            let t = self.ty(*v);
            if !t.shape.is_empty() || !matches!(t.dtype, DType::I32 | DType::I64) {
                ir_bail!(
                    "loop bound {} must be a scalar integer, got {}",
                    ["start", "end", "step"][i],
                    t
                );
            }
        }
        Ok(self.push(
            Op::For {
                lo,
                hi,
                step,
                inits,
                body,
            },
            types,
        ))
    }

    /// Appends an `if` with results of `types`.
    pub fn if_(
        &mut self,
        cond: ValueId,
        then_block: Block,
        else_block: Block,
        types: Vec<Type>,
    ) -> R<Vec<ValueId>> {
        let t = self.ty(cond);
        if t.dtype != DType::I1 || !t.shape.is_empty() {
            ir_bail!(
                "`if` condition must be a scalar mask (the whole program branches), got {}",
                t
            );
        }
        Ok(self.push(
            Op::If {
                cond,
                then_block,
                else_block,
            },
            types,
        ))
    }
}
