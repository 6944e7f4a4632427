//! The launch contract between generated kernel launchers and a device runtime.
//!
//! `#[kernel]` generates, per kernel, a typed launcher that checks its arguments against a
//! [`Variant`]'s requirements, computes the grid and turns the arguments into
//! [`KernelParam`]s. The launcher then hands everything to a [`Launcher`], which the runtime
//! implements with cudarc (module cache, stream, argument pushing). This crate knows nothing
//! about CUDA: it only describes what to launch.

use crate::dtype::Storage;
use thiserror::Error;

/// A GPU architecture a variant has PTX for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere baseline (A100); its PTX also runs on every later GPU.
    Sm80,
    /// Hopper (H100/H200): PTX for `sm_90a` (`wgmma`), which runs on compute capability 9.0
    /// only.
    Sm90,
}

impl Arch {
    /// Picks the best PTX target for a device of compute capability `major.minor`.
    pub fn for_compute_capability(major: u32, minor: u32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90),
            // Arch-specific (`a`) PTX does not carry forward: newer GPUs JIT the sm_80 PTX.
            (8, _) | (9, _) | (10..=12, _) => Some(Arch::Sm80),
            _ => None,
        }
    }
}

/// One compiled instantiation of a kernel: fixed dtypes, compile-time constants and alignment
/// class, with its PTX for each architecture.
#[derive(Debug)]
pub struct Variant {
    /// Kernel name (the Rust function name).
    pub kernel: &'static str,
    /// Unique symbol of this variant, also the PTX entry name (`softmax_bf16_4096_1024_a16`).
    pub symbol: &'static str,
    /// Compile-time parameters as `(name, value)`, e.g. `("T", "bf16")`, `("BLOCK", "1024")`.
    pub params: &'static [(&'static str, &'static str)],
    /// Alignment class in bytes: 16 means every tensor base pointer is 16-byte aligned and every
    /// row stride and contiguous extent is a multiple of 16 bytes; 0 means no assumption
    /// beyond element alignment.
    pub align: usize,
    /// Threads per program (CTA).
    pub threads: u32,
    /// Shared memory of the kernel in bytes.
    pub smem_bytes: u32,
    /// Whether that memory is dynamic (above the 48 KB static limit): the launcher passes
    /// `smem_bytes` at launch and opts the function into it. Otherwise it is declared
    /// statically in the PTX.
    pub dynamic_smem: bool,
    /// Final tile IR text of this variant (after all passes).
    pub ir: &'static str,
    /// PTX for sm_80.
    pub ptx_sm80: &'static str,
    /// PTX for sm_90.
    pub ptx_sm90: &'static str,
    /// Tensor maps the sm_90 PTX takes after the ordinary parameters, in order (empty when
    /// no loop is streamed by TMA). The runtime encodes them at launch.
    pub tma: &'static [TmaMap],
}

/// A tensor map (the TMA's descriptor of a global tensor and the box one copy moves) that a
/// variant's sm_90 PTX takes as a 128-byte `.param`: the runtime encodes it at launch from the
/// tensor whose base pointer is parameter `param`, in [`push_tensor`]'s order: its `rank`
/// extents follow, then the strides of all but the last dimension (in elements). The box is
/// `box_rows x box_cols`, one index deep along a rank-3 tensor's middle dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TmaMap {
    pub param: usize,
    /// 2 or 3.
    pub rank: usize,
    /// Element size in bytes.
    pub elem: usize,
    /// Box: rows, and columns (the inner, contiguous dimension; `swizzle / elem`).
    pub box_rows: u32,
    pub box_cols: u32,
    /// Shared-memory swizzle in bytes (128, 64 or 32).
    pub swizzle: u32,
    /// Whether the elements are encoded as f32: the map is the target of a bulk reduction
    /// (`cp.reduce.async.bulk.tensor ... .add`, whose arithmetic the map's element type
    /// selects). Copies move raw bits and encode unsigned integers of `elem` bytes.
    pub float32: bool,
}

impl Variant {
    /// The PTX for `arch`.
    pub fn ptx(&self, arch: Arch) -> &'static str {
        match arch {
            Arch::Sm80 => self.ptx_sm80,
            Arch::Sm90 => self.ptx_sm90,
        }
    }

    /// Value of a compile-time parameter by name.
    pub fn param(&self, name: &str) -> Option<&'static str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

/// A device tensor as a kernel sees it: a base address, its element type, and dims/strides in
/// elements (row-major: last dim fastest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorArg {
    /// Device address of element `[0, .., 0]`.
    pub ptr: u64,
    /// Element type in memory.
    pub dtype: Storage,
    /// Extent of each dimension.
    pub dims: Vec<usize>,
    /// Stride of each dimension in elements.
    pub strides: Vec<usize>,
}

impl TensorArg {
    /// A contiguous row-major tensor.
    pub fn contiguous(ptr: u64, dtype: Storage, dims: &[usize]) -> TensorArg {
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        TensorArg {
            ptr,
            dtype,
            dims: dims.to_vec(),
            strides,
        }
    }

    /// Extent of dimension `i` (0 when out of range, so grid formulas never panic).
    pub fn dim(&self, i: usize) -> usize {
        self.dims.get(i).copied().unwrap_or(0)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }
}

/// One kernel parameter as pushed to the driver, in PTX parameter order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelParam {
    /// A `.u64` global address.
    Ptr(u64),
    /// A `.s64` integer (sizes, strides, `usize` scalars).
    I64(i64),
    /// A `.s32` integer.
    I32(i32),
    /// A `.f32` scalar.
    F32(f32),
}

/// Everything a runtime needs to launch one variant.
#[derive(Debug)]
pub struct LaunchSpec<'a> {
    /// The variant (its symbol names the PTX entry).
    pub variant: &'static Variant,
    /// Programs along x, y, z.
    pub grid: [u32; 3],
    /// Parameters in order.
    pub params: &'a [KernelParam],
}

/// Implemented by a device runtime: loads (and caches) the variant's module and launches it.
pub trait Launcher {
    /// The architecture whose PTX this launcher loads.
    fn arch(&self) -> Arch;
    /// Launches asynchronously on the launcher's stream.
    fn launch(&self, spec: &LaunchSpec<'_>) -> Result<(), LaunchError>;
}

/// Why a launch did not happen. Every variant names the kernel and, where one is at fault,
/// the argument.
#[derive(Debug, Error, PartialEq)]
pub enum LaunchError {
    /// An argument's shape, stride, dtype or alignment does not suit any compiled variant.
    #[error("kernel `{kernel}`: argument `{arg}`: {reason}")]
    BadArgument {
        kernel: &'static str,
        arg: &'static str,
        reason: String,
    },
    /// A requirement between arguments (declared in the kernel's `require`) does not hold.
    #[error("kernel `{kernel}`: requirement `{requirement}` does not hold ({detail})")]
    Requirement {
        kernel: &'static str,
        requirement: &'static str,
        detail: String,
    },
    /// No variant was compiled for the requested compile-time parameters.
    #[error("kernel `{kernel}`: no variant for {wanted}")]
    NoVariant {
        kernel: &'static str,
        wanted: String,
    },
    /// The grid computed from the arguments exceeds the hardware limits.
    #[error("kernel `{kernel}`: grid {grid:?} exceeds the launch limits")]
    Grid {
        kernel: &'static str,
        grid: [u64; 3],
    },
    /// The driver refused the module or the launch.
    #[error("kernel `{kernel}`: driver error: {message}")]
    Driver {
        kernel: &'static str,
        message: String,
    },
    /// The interpreter failed (a kernel bug: out-of-bounds access, division by zero).
    #[error("kernel `{kernel}`: interpreter: {message}")]
    Interpreter {
        kernel: &'static str,
        message: String,
    },
}

/// Hardware grid limits (x up to 2^31-1, y and z up to 65535).
pub fn check_grid(kernel: &'static str, grid: [u64; 3]) -> Result<[u32; 3], LaunchError> {
    if grid[0] > (i32::MAX as u64) || grid[1] > 65535 || grid[2] > 65535 {
        return Err(LaunchError::Grid { kernel, grid });
    }
    Ok([grid[0] as u32, grid[1] as u32, grid[2] as u32])
}

/// Ceiling division, for grid formulas.
pub fn cdiv(a: usize, b: usize) -> usize {
    a.div_ceil(b.max(1))
}

/// A kernel as listed by `lexp kernels`: its name, one-line doc and compiled variants.
#[derive(Debug)]
pub struct KernelInfo {
    /// Kernel name.
    pub name: &'static str,
    /// First line of the kernel's doc comment.
    pub doc: &'static str,
    /// Every compiled variant.
    pub variants: &'static [Variant],
}

/// Anything with dimensions, so that grid formulas and requirements work on device tensors
/// and host tensors alike.
pub trait Dims {
    /// Extent of dimension `i` (0 when out of range).
    fn dim(&self, i: usize) -> usize;
}

impl Dims for TensorArg {
    fn dim(&self, i: usize) -> usize {
        TensorArg::dim(self, i)
    }
}

/// What a kernel expects of one tensor argument.
#[derive(Debug)]
pub struct TensorSpec {
    /// Parameter name.
    pub name: &'static str,
    /// Number of dimensions.
    pub rank: usize,
    /// Element type; `None` for the kernel's type parameter.
    pub elem: Option<Storage>,
    /// Whether the kernel writes it.
    pub mutable: bool,
}

fn bad(kernel: &'static str, arg: &'static str, reason: String) -> LaunchError {
    LaunchError::BadArgument {
        kernel,
        arg,
        reason,
    }
}

/// Checks tensor arguments against `specs`, resolves compile-time constants (given values, else
/// each one's first listed value) and picks the variant: the element type of the type
/// parameter, the constants, and the widest alignment class every tensor satisfies
/// (`force_align` overrides, e.g. 0 for the interpreter). Returns the variant and the constants'
/// values in `consts` order.
pub fn select_variant(
    kernel: &'static str,
    variants: &'static [Variant],
    specs: &[TensorSpec],
    tensors: &[&TensorArg],
    consts: &[(&'static str, &'static [usize])],
    given: &[(&str, usize)],
    force_align: Option<usize>,
) -> Result<(&'static Variant, Vec<usize>), LaunchError> {
    let mut elem: Option<Storage> = None;
    let mut aligned = true;
    for (spec, t) in specs.iter().zip(tensors) {
        if t.dims.len() != spec.rank || t.strides.len() != spec.rank {
            return Err(bad(
                kernel,
                spec.name,
                format!(
                    "expected {} dimensions, got dims {:?} strides {:?}",
                    spec.rank, t.dims, t.strides
                ),
            ));
        }
        let want = match spec.elem {
            Some(e) => e,
            None => *elem.get_or_insert(t.dtype),
        };
        if t.dtype != want {
            return Err(bad(
                kernel,
                spec.name,
                format!(
                    "element type {} does not match {} of the other tensors",
                    t.dtype.name(),
                    want.name()
                ),
            ));
        }
        let last = spec.rank - 1;
        if t.strides[last] != 1 && t.dims[last] > 1 {
            return Err(bad(
                kernel,
                spec.name,
                format!(
                    "the last dimension must be contiguous (stride 1), got stride {}",
                    t.strides[last]
                ),
            ));
        }
        let eb = t.dtype.bytes();
        if t.ptr % eb as u64 != 0 {
            return Err(bad(
                kernel,
                spec.name,
                format!(
                    "address {:#x} is not aligned to its {}-byte elements",
                    t.ptr, eb
                ),
            ));
        }
        // Each dimension's step must clear the whole extent of the dimensions inside it.
        for d in 0..last {
            let inner = t.dims[d + 1].saturating_sub(1) * t.strides[d + 1] + 1;
            if t.dims[d] > 1 && t.strides[d] < inner {
                return Err(bad(
                    kernel,
                    spec.name,
                    format!(
                        "dimension {d} overlaps: stride {} < the {inner} elements inside it",
                        t.strides[d]
                    ),
                ));
            }
        }
        let per16 = 16 / eb;
        // Index tensors (i32) are never assumed aligned (see the macro's parameters).
        aligned &= t.dtype == Storage::I32
            || t.ptr % 16 == 0
                && t.dims[last] % per16 == 0
                && t.strides[..last].iter().all(|s| s % per16 == 0);
    }
    for (name, _) in given {
        if !consts.iter().any(|(n, _)| n == name) {
            let known: Vec<&str> = consts.iter().map(|(n, _)| *n).collect();
            return Err(LaunchError::NoVariant {
                kernel,
                wanted: format!(
                    "unknown constant `{name}` (the kernel's constants: {})",
                    known.join(", ")
                ),
            });
        }
    }
    // Constants not given take their value from the first compiled variant (in compilation
    // order) that matches the given ones, the element type and the alignment class: `only`
    // filters may leave out the first listed value of a constant.
    for (name, v) in given {
        if let Some((_, allowed)) = consts.iter().find(|(n, _)| n == name) {
            if !allowed.contains(v) {
                return Err(LaunchError::NoVariant {
                    kernel,
                    wanted: format!("{name} = {v} (compiled: {allowed:?})"),
                });
            }
        }
    }
    let mut align = force_align.unwrap_or(if aligned { 16 } else { 0 });
    if !variants.iter().any(|v| v.align == 0) {
        // Only the 16-byte class was compiled (tensor-core kernels).
        if !aligned && force_align.is_none() {
            let culprit = specs
                .iter()
                .zip(tensors)
                .find(|(_, t)| {
                    if t.dtype == Storage::I32 {
                        return false;
                    }
                    let per16 = 16 / t.dtype.bytes();
                    let last = t.dims.len() - 1;
                    !(t.ptr % 16 == 0
                        && t.dims[last] % per16 == 0
                        && t.strides[..last].iter().all(|s| s % per16 == 0))
                })
                .map(|(s, _)| s.name)
                .unwrap_or("?");
            return Err(bad(
                kernel,
                culprit,
                "this kernel needs 16-byte aligned tensors: base address a multiple of 16 bytes and the row length and row stride multiples of 16 bytes (pad the tensor)".into(),
            ));
        }
        align = 16;
    }
    let found = variants.iter().find(|v| {
        v.align == align
            && elem.map(|e| v.param("T") == Some(e.name())).unwrap_or(true)
            && given
                .iter()
                .all(|(n, val)| v.param(n) == Some(val.to_string().as_str()))
    });
    match found {
        Some(v) => {
            let values = consts
                .iter()
                .map(|(n, _)| v.param(n).and_then(|x| x.parse().ok()).unwrap_or(0))
                .collect();
            Ok((v, values))
        }
        None => Err(LaunchError::NoVariant {
            kernel,
            wanted: format!(
                "T = {}, constants {given:?}, alignment {align}",
                elem.map(|e| e.name()).unwrap_or("-")
            ),
        }),
    }
}

/// Appends a tensor's parameters in kernel order: pointer, dims, strides of all but the last
/// dimension (the last has stride 1 by contract).
pub fn push_tensor(params: &mut Vec<KernelParam>, t: &TensorArg) {
    params.push(KernelParam::Ptr(t.ptr));
    params.extend(t.dims.iter().map(|d| KernelParam::I64(*d as i64)));
    let n = t.strides.len().saturating_sub(1);
    params.extend(t.strides[..n].iter().map(|s| KernelParam::I64(*s as i64)));
}

impl KernelInfo {
    /// Every combination of compile-time constants (the element type aside) the kernel was
    /// compiled with, in compilation order (the first is the launcher's default): the tile
    /// configurations a benchmark or the autotuner chooses among.
    pub fn configurations(&self) -> Vec<Vec<(&'static str, usize)>> {
        let mut out: Vec<Vec<(&'static str, usize)>> = vec![];
        for v in self.variants {
            let combo: Vec<(&'static str, usize)> = v
                .params
                .iter()
                .filter(|(n, _)| *n != "T")
                .filter_map(|(n, val)| val.parse().ok().map(|x| (*n, x)))
                .collect();
            if !out.contains(&combo) {
                out.push(combo);
            }
        }
        if out.is_empty() {
            out.push(vec![]);
        }
        out
    }
}
