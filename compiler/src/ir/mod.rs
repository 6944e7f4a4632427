//! The tile IR: SSA over statically shaped tiles.
//!
//! A [`Kernel`] is one program of a grid: it reads its [`Op::ProgramId`], builds index tiles
//! with [`Op::Range`], loads and stores through pointer tiles with masks, and computes on tiles
//! whose shapes are compile-time constants. Control flow is structured ([`Op::For`] with
//! loop-carried values, [`Op::If`] with results, early [`Op::Return`]), so every pass can walk
//! the IR as a tree. Values are numbered [`ValueId`]s; their types live in [`Kernel::types`].
//!
//! The text form ([`printer`], [`parser`]) is what snapshots show and what tests start from.

pub mod builder;
pub mod parser;
pub mod printer;

use crate::dtype::DType;
use std::fmt;

pub use builder::Builder;

/// An SSA value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// The type of a value: an element type and a static shape (`[]` is a scalar, uniform over the
/// program).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl Type {
    /// A scalar of `dtype`.
    pub fn scalar(dtype: DType) -> Type {
        Type {
            dtype,
            shape: vec![],
        }
    }

    /// A tile of `dtype` with `shape`.
    pub fn tile(dtype: DType, shape: &[usize]) -> Type {
        Type {
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Same shape, other dtype.
    pub fn with_dtype(&self, dtype: DType) -> Type {
        Type {
            dtype,
            shape: self.shape.clone(),
        }
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dtype)?;
        if !self.shape.is_empty() {
            let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
            write!(f, "[{}]", dims.join(","))?;
        }
        Ok(())
    }
}

/// Element-wise binary operations. Operands have equal types (the builder broadcasts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
    Max,
    Min,
    And,
    Or,
}

/// Comparisons; the result is `i1` of the operands' shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpPred {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// Element-wise unary operations. Transcendentals are defined on floats and computed in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
    Abs,
    Exp,
    Exp2,
    Log,
    Log2,
    Sqrt,
    Rsqrt,
    Tanh,
}

/// Reductions along one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    Sum,
    Max,
    Min,
}

/// A constant's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConstValue {
    Int(i64),
    Float(f64),
}

impl Eq for ConstValue {}
impl std::hash::Hash for ConstValue {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            ConstValue::Int(i) => (0u8, *i).hash(state),
            ConstValue::Float(x) => (1u8, x.to_bits()).hash(state),
        }
    }
}

impl ConstValue {
    /// The value as f64.
    pub fn as_f64(self) -> f64 {
        match self {
            ConstValue::Int(i) => i as f64,
            ConstValue::Float(x) => x,
        }
    }
}

/// One operation. Operands are [`ValueId`]s; results are listed in [`Inst::results`].
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Index of this program along `axis` (0, 1, 2) of the grid: scalar i32.
    ProgramId {
        axis: u8,
    },
    /// A constant splatted to the result type.
    Const {
        value: ConstValue,
    },
    /// `[0, 1, .., n-1]` as `i32[n]`.
    Range {
        n: usize,
    },
    /// A scalar repeated to the result shape.
    Splat {
        src: ValueId,
    },
    /// Inserts a dimension of extent 1 at `axis`.
    ExpandDims {
        src: ValueId,
        axis: usize,
    },
    /// The same tile in another distributed layout (inserted by the layout pass; the data moves
    /// through shared memory). A no-op for the interpreter.
    ConvertLayout {
        src: ValueId,
    },
    /// Repeats dimensions of extent 1 to the result shape.
    Broadcast {
        src: ValueId,
    },
    Binary {
        op: BinOp,
        lhs: ValueId,
        rhs: ValueId,
    },
    Cmp {
        pred: CmpPred,
        lhs: ValueId,
        rhs: ValueId,
    },
    Unary {
        op: UnOp,
        src: ValueId,
    },
    /// `cond ? a : b` element-wise.
    Select {
        cond: ValueId,
        a: ValueId,
        b: ValueId,
    },
    /// Converts to the result dtype (float rounding to nearest even; int sign extension).
    Cast {
        src: ValueId,
    },
    /// Pointer tile plus an integer offset tile (in elements).
    AddPtr {
        ptr: ValueId,
        offset: ValueId,
    },
    /// Loads through a pointer tile; masked-off elements get `other` (0 when absent).
    Load {
        ptr: ValueId,
        mask: Option<ValueId>,
        other: Option<ValueId>,
    },
    /// Stores a value tile through a pointer tile where `mask` holds.
    Store {
        ptr: ValueId,
        value: ValueId,
        mask: Option<ValueId>,
    },
    /// Atomically adds a value tile (f32) to memory where `mask` holds.
    AtomicAdd {
        ptr: ValueId,
        value: ValueId,
        mask: Option<ValueId>,
    },
    /// Reduces `src` along `axis`.
    Reduce {
        src: ValueId,
        axis: usize,
        kind: ReduceKind,
    },
    /// `for iv in (lo..hi).step_by(step)` carrying `inits` through the body's `Yield`. The body's
    /// arguments are the induction variable then the carried values; results are the carried
    /// values after the last iteration.
    For {
        lo: ValueId,
        hi: ValueId,
        step: ValueId,
        inits: Vec<ValueId>,
        body: Block,
    },
    /// Structured conditional on a scalar i1; both blocks end in `Yield` of the results.
    If {
        cond: ValueId,
        then_block: Block,
        else_block: Block,
    },
    /// Ends a `For` body or an `If` branch with the values it produces.
    Yield {
        values: Vec<ValueId>,
    },
    /// Ends the program early.
    Return,
    /// Swaps the two dimensions of a rank-2 tile. Free: the result's layout is the operand's
    /// with its dimensions swapped, so no data moves.
    Trans {
        src: ValueId,
    },
    /// `acc + a · b` with `a: [M, K]`, `b: [K, N]` (bf16 or f16) and `acc`, result: `[M, N]`
    /// f32. Lowered to tensor-core `mma.sync` (COMPILER.md §2): operands are staged in shared
    /// memory (by `cp.async` when the pipeliner can stream them, else from registers) and read
    /// with `ldmatrix`; the accumulator lives in the MMA fragment layout.
    Dot {
        a: ValueId,
        b: ValueId,
        acc: ValueId,
    },
}

impl Op {
    /// Values this op reads directly (not counting nested blocks).
    pub fn operands(&self) -> Vec<ValueId> {
        match self {
            Op::ProgramId { .. } | Op::Const { .. } | Op::Range { .. } | Op::Return => vec![],
            Op::Splat { src }
            | Op::ExpandDims { src, .. }
            | Op::Broadcast { src }
            | Op::ConvertLayout { src }
            | Op::Unary { src, .. }
            | Op::Cast { src }
            | Op::Trans { src }
            | Op::Reduce { src, .. } => vec![*src],
            Op::Dot { a, b, acc } => vec![*a, *b, *acc],
            Op::Binary { lhs, rhs, .. } | Op::Cmp { lhs, rhs, .. } => vec![*lhs, *rhs],
            Op::Select { cond, a, b } => vec![*cond, *a, *b],
            Op::AddPtr { ptr, offset } => vec![*ptr, *offset],
            Op::Load { ptr, mask, other } => {
                let mut v = vec![*ptr];
                v.extend(mask.iter().chain(other.iter()).copied());
                v
            }
            Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } => {
                let mut v = vec![*ptr, *value];
                v.extend(mask.iter().copied());
                v
            }
            Op::For {
                lo,
                hi,
                step,
                inits,
                ..
            } => {
                let mut v = vec![*lo, *hi, *step];
                v.extend(inits.iter().copied());
                v
            }
            Op::If { cond, .. } => vec![*cond],
            Op::Yield { values } => values.clone(),
        }
    }

    /// Rewrites every direct operand through `f`.
    pub fn map_operands(&mut self, f: &mut impl FnMut(ValueId) -> ValueId) {
        match self {
            Op::ProgramId { .. } | Op::Const { .. } | Op::Range { .. } | Op::Return => {}
            Op::Splat { src }
            | Op::ExpandDims { src, .. }
            | Op::Broadcast { src }
            | Op::ConvertLayout { src }
            | Op::Unary { src, .. }
            | Op::Cast { src }
            | Op::Trans { src }
            | Op::Reduce { src, .. } => *src = f(*src),
            Op::Dot { a, b, acc } => {
                *a = f(*a);
                *b = f(*b);
                *acc = f(*acc);
            }
            Op::Binary { lhs, rhs, .. } | Op::Cmp { lhs, rhs, .. } => {
                *lhs = f(*lhs);
                *rhs = f(*rhs);
            }
            Op::Select { cond, a, b } => {
                *cond = f(*cond);
                *a = f(*a);
                *b = f(*b);
            }
            Op::AddPtr { ptr, offset } => {
                *ptr = f(*ptr);
                *offset = f(*offset);
            }
            Op::Load { ptr, mask, other } => {
                *ptr = f(*ptr);
                if let Some(m) = mask {
                    *m = f(*m);
                }
                if let Some(o) = other {
                    *o = f(*o);
                }
            }
            Op::Store { ptr, value, mask } | Op::AtomicAdd { ptr, value, mask } => {
                *ptr = f(*ptr);
                *value = f(*value);
                if let Some(m) = mask {
                    *m = f(*m);
                }
            }
            Op::For {
                lo,
                hi,
                step,
                inits,
                ..
            } => {
                *lo = f(*lo);
                *hi = f(*hi);
                *step = f(*step);
                for v in inits.iter_mut() {
                    *v = f(*v);
                }
            }
            Op::If { cond, .. } => *cond = f(*cond),
            Op::Yield { values } => {
                for v in values.iter_mut() {
                    *v = f(*v);
                }
            }
        }
    }

    /// Nested blocks, in order.
    pub fn blocks(&self) -> Vec<&Block> {
        match self {
            Op::For { body, .. } => vec![body],
            Op::If {
                then_block,
                else_block,
                ..
            } => vec![then_block, else_block],
            _ => vec![],
        }
    }

    /// Nested blocks, mutably.
    pub fn blocks_mut(&mut self) -> Vec<&mut Block> {
        match self {
            Op::For { body, .. } => vec![body],
            Op::If {
                then_block,
                else_block,
                ..
            } => vec![then_block, else_block],
            _ => vec![],
        }
    }

    /// True when the op has no effect besides its results (so CSE, DCE and hoisting may touch it).
    pub fn is_pure(&self) -> bool {
        !matches!(
            self,
            Op::Load { .. }
                | Op::Store { .. }
                | Op::AtomicAdd { .. }
                | Op::For { .. }
                | Op::If { .. }
                | Op::Yield { .. }
                | Op::Return
        )
    }
}

/// An op and the values it defines.
#[derive(Clone, Debug, PartialEq)]
pub struct Inst {
    pub results: Vec<ValueId>,
    pub op: Op,
}

/// A straight-line list of instructions with block arguments (loop bodies have the induction
/// variable and the carried values as arguments).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Block {
    pub args: Vec<ValueId>,
    pub insts: Vec<Inst>,
}

/// What a kernel argument is, as the launcher passes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    /// The argument's value in the body.
    pub value: ValueId,
    /// Name for printing and error messages (`x`, `x.dim0`, `x.stride0`).
    pub name: String,
    /// Largest power of two known to divide the value (elements for ints, bytes for pointers),
    /// as guaranteed by the launcher for this variant. 1 means nothing is known.
    pub div: u64,
}

/// One kernel variant: arguments, body, and launch shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub name: String,
    pub args: Vec<Arg>,
    pub body: Block,
    /// Warps per program.
    pub num_warps: usize,
    /// Depth of the `cp.async` pipeline that streams `dot` operands through shared memory in
    /// loops (COMPILER.md §4.1); 1 turns pipelining off.
    pub num_stages: usize,
    /// Copy streamed `dot` operands with the tensor memory accelerator on sm_90a (bulk tensor
    /// copies completing on mbarriers, COMPILER.md §8.2) where they qualify
    /// ([`crate::passes::tma`]); `cp.async` otherwise and on sm_80.
    pub tma: bool,
    /// Ping-pong the two warpgroups of an 8-warp kernel through the warpgroup MMAs of its
    /// pipelined loops on sm_90a (FlashAttention-3's warpgroup scheduling): each warpgroup
    /// issues its MMAs only after the other has issued its own, so that one computes its
    /// element-wise work (a softmax) while the tensor cores run the other's MMAs.
    ///
    /// No kernel uses it: every flash-attention configuration measured slower with it on the
    /// H200 (forward 4.75 against 3.57 ms at 16k tokens, heads of 64;
    /// `bench/results/2026-11-30-h200-timing/call76`). Two CTAs per multiprocessor already
    /// interleave their warpgroups, and without a producer warp the turns serialise them (thread
    /// 0's refill waits for the other warpgroup's release). It is kept, tested, for a
    /// warp-specialised loop (COMPILER.md §8.3), where FlashAttention-3 gains from it.
    pub pingpong: bool,
    /// Programs (CTAs) per multiprocessor the code must fit (`minctasm`, so ptxas caps the
    /// registers at `65536 / (min_ctas · threads)`); 1, the default, lets a program take up to
    /// 255 registers per thread.
    pub min_ctas: usize,
    /// Type of every value, indexed by `ValueId.0`.
    pub types: Vec<Type>,
}

impl Kernel {
    /// An empty kernel.
    pub fn new(name: &str, num_warps: usize) -> Kernel {
        Kernel {
            name: name.to_string(),
            args: vec![],
            body: Block::default(),
            num_warps,
            num_stages: 1,
            tma: false,
            pingpong: false,
            min_ctas: 1,
            types: vec![],
        }
    }

    /// Creates a fresh value of type `ty`.
    pub fn new_value(&mut self, ty: Type) -> ValueId {
        self.types.push(ty);
        ValueId(self.types.len() as u32 - 1)
    }

    /// Adds an argument.
    pub fn add_arg(&mut self, name: &str, dtype: DType, div: u64) -> ValueId {
        let value = self.new_value(Type::scalar(dtype));
        self.args.push(Arg {
            value,
            name: name.to_string(),
            div,
        });
        value
    }

    /// Type of a value.
    pub fn ty(&self, v: ValueId) -> &Type {
        &self.types[v.0 as usize]
    }

    /// Threads per program.
    pub fn num_threads(&self) -> usize {
        self.num_warps * 32
    }

    /// Calls `f` on every instruction, pre-order (an op before its nested blocks).
    pub fn walk(&self, f: &mut impl FnMut(&Inst)) {
        fn go(b: &Block, f: &mut impl FnMut(&Inst)) {
            for inst in &b.insts {
                f(inst);
                for nb in inst.op.blocks() {
                    go(nb, f);
                }
            }
        }
        go(&self.body, f);
    }
}

/// An error found while building, parsing or checking IR.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct IrError(pub String);

/// Shorthand for `Err(IrError(format!(..)))`.
#[macro_export]
macro_rules! ir_bail {
    ($($t:tt)*) => { return Err($crate::ir::IrError(format!($($t)*))) };
}
