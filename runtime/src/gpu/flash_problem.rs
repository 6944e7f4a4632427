//! One stand-alone flash-attention problem on the device, outside the engine: random inputs
//! (never zeros), poisoned outputs, and the four kernels launched on it with any tile
//! configuration. Shared by the kernels' GPU test (`tests/gpu_flash.rs`, every configuration
//! against the f64 reference) and `lexp bench attention` (the engine's configurations against
//! PyTorch SDPA).

use super::attention::{flash_kernels_for, stats_cols, FlashConfig};
use super::flash_launch::{self as fl, Bwd, BwdArgs, FlashFamily};
use crate::buffer::DeviceTensor;
use crate::data::SplitMix64;
use crate::device::CudaDevice;
use crate::error::Result;
use lexp_compiler::dtype::Storage;
use lexp_kernels::flash_attention::{key_blocks, query_blocks, BlockRow};

/// The tensors of one causal attention problem over packed sequences: inputs
/// `qkv [T, 3·nh, hd]` (uniform in ±2) and `dO [T, nh, hd]` (±1), outputs `o`, `lse2` and
/// `delta` (`[nh, T]` with rows padded to 16 bytes, as the engine lays them out) and `dqkv`.
pub struct FlashProblem {
    /// Packed q, k and v (head `h` of each at `h`, `nh + h`, `2·nh + h` of the middle
    /// dimension).
    pub qkv: DeviceTensor,
    /// The output gradient.
    pub d_o: DeviceTensor,
    /// The forward's output.
    pub o: DeviceTensor,
    /// Base-2 log-sum-exp per (head, token).
    pub lse2: DeviceTensor,
    /// `rowsum(dO ⊙ O)` per (head, token).
    pub delta: DeviceTensor,
    /// The input gradient, laid out like `qkv`.
    pub dqkv: DeviceTensor,
    /// The fused backward's f32 `dq` accumulator, `[T, nh, hd]`.
    pub dq_acc: DeviceTensor,
    /// Softmax scale `hd^-0.5`.
    pub scale: f32,
    /// Tokens.
    pub t: usize,
    /// Heads.
    pub nh: usize,
    /// Head dimension.
    pub hd: usize,
    /// The kernels that take these heads ([`flash_kernels_for`]).
    pub family: FlashFamily,
    /// `flash_bwd_delta`'s tile width for these heads ([`FlashConfig::delta_width`]).
    pub width: usize,
}

fn uniform(rng: &mut SplitMix64, n: usize, a: f64) -> Vec<f32> {
    (0..n)
        .map(|_| (((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * a) as f32)
        .collect()
}

/// A block list (`[rows, 3]` i32) on the device.
pub fn block_tensor(dev: &CudaDevice, rows: &[BlockRow]) -> Result<DeviceTensor> {
    let flat: Vec<i32> = rows.iter().flatten().copied().collect();
    DeviceTensor::from_i32(dev, &[rows.len(), 3], &flat)
}

impl FlashProblem {
    /// Random inputs for `t` tokens and `nh` heads of `hd` in `dtype` (seeded), outputs
    /// poisoned.
    pub fn new(
        dev: &CudaDevice,
        dtype: Storage,
        t: usize,
        (nh, hd): (usize, usize),
        seed: u64,
    ) -> Result<FlashProblem> {
        let cfg = flash_kernels_for(hd);
        let (family, width) = cfg.map_or((FlashFamily::Tile, hd), |c| (c.family, c.delta_width()));
        let mut rng = SplitMix64::new(seed);
        let mut random = |dims: &[usize], a: f64| {
            let n = dims.iter().product();
            DeviceTensor::from_f32(dev, dtype, dims, &uniform(&mut rng, n, a))
        };
        let (qkv, d_o) = (random(&[t, 3 * nh, hd], 2.0)?, random(&[t, nh, hd], 1.0)?);
        let stats = [nh, stats_cols(t)];
        Ok(FlashProblem {
            qkv,
            d_o,
            o: DeviceTensor::poisoned(dev, dtype, &[t, nh, hd])?,
            lse2: DeviceTensor::poisoned(dev, Storage::F32, &stats)?,
            delta: DeviceTensor::poisoned(dev, Storage::F32, &stats)?,
            dqkv: DeviceTensor::poisoned(dev, dtype, &[t, 3 * nh, hd])?,
            dq_acc: DeviceTensor::poisoned(dev, Storage::F32, &[t, nh, hd])?,
            scale: (hd as f32).powf(-0.5),
            t,
            nh,
            hd,
            family,
            width,
        })
    }

    /// Poisons every output (NaN) again.
    pub fn poison_outputs(&mut self) -> Result<()> {
        for x in [
            &mut self.o,
            &mut self.lse2,
            &mut self.delta,
            &mut self.dqkv,
            &mut self.dq_acc,
        ] {
            x.poison()?;
        }
        Ok(())
    }

    /// The forward (of [`Self::family`]) with tile configuration `consts` over the query
    /// blocks `blocks`.
    pub fn fwd(
        &self,
        dev: &CudaDevice,
        consts: &[(&str, usize)],
        blocks: &DeviceTensor,
    ) -> Result<()> {
        fl::fwd(
            dev,
            self.family,
            consts,
            &self.qkv.as_arg(),
            &blocks.as_arg(),
            self.scale,
            &self.o.as_arg(),
            &self.lse2.as_arg(),
        )?;
        Ok(())
    }

    /// `flash_bwd_delta` (from `o` and `dO`).
    pub fn delta(&self, dev: &CudaDevice) -> Result<()> {
        fl::delta(
            dev,
            self.width,
            &self.o.as_arg(),
            &self.d_o.as_arg(),
            &self.delta.as_arg(),
        )?;
        Ok(())
    }

    /// Calls `f` with the tensors as the backward launches' arguments.
    fn with_bwd_args<T>(&self, f: impl FnOnce(&BwdArgs) -> T) -> T {
        f(&BwdArgs {
            qkv: &self.qkv.as_arg(),
            d_o: &self.d_o.as_arg(),
            lse2: &self.lse2.as_arg(),
            delta: &self.delta.as_arg(),
            dqkv: &self.dqkv.as_arg(),
            scale: self.scale,
        })
    }

    fn bwd(
        &self,
        dev: &CudaDevice,
        which: Bwd,
        consts: &[(&str, usize)],
        blocks: &DeviceTensor,
    ) -> Result<()> {
        self.with_bwd_args(|a| fl::bwd(dev, self.family, which, consts, &blocks.as_arg(), a))?;
        Ok(())
    }

    /// dk and dv with `consts` over the key blocks `blocks`.
    pub fn dkdv(
        &self,
        dev: &CudaDevice,
        consts: &[(&str, usize)],
        blocks: &DeviceTensor,
    ) -> Result<()> {
        self.bwd(dev, Bwd::DkDv, consts, blocks)
    }

    /// dq with `consts` over the query blocks `blocks`.
    pub fn dq(
        &self,
        dev: &CudaDevice,
        consts: &[(&str, usize)],
        blocks: &DeviceTensor,
    ) -> Result<()> {
        self.bwd(dev, Bwd::Dq, consts, blocks)
    }

    /// The fused backward (tile family): `flash_bwd_prep` (delta, the accumulator cleared),
    /// `flash_bwd_fused` with `consts` over the key blocks `blocks`, `flash_bwd_dq_store`.
    pub fn fused(
        &self,
        dev: &CudaDevice,
        consts: &[(&str, usize)],
        blocks: &DeviceTensor,
    ) -> Result<()> {
        let acc = self.dq_acc.as_arg();
        self.with_bwd_args(|a| {
            fl::prep(dev, self.width, &self.o.as_arg(), a.d_o, a.delta, &acc)?;
            fl::fused(dev, consts, &blocks.as_arg(), a, &acc)?;
            fl::dq_store(dev, self.width, &acc, self.scale, a.dqkv)
        })?;
        Ok(())
    }

    /// The tensors as the block-sparse kernels' arguments
    /// ([`super::sparse_attention::forward`] and [`backward`](super::sparse_attention::backward)).
    pub fn attn_args(&self) -> super::sparse_attention::AttnArgs {
        super::sparse_attention::AttnArgs {
            qkv: self.qkv.as_arg(),
            o: self.o.as_arg(),
            lse2: self.lse2.as_arg(),
            d_o: self.d_o.as_arg(),
            delta: self.delta.as_arg(),
            dqkv: self.dqkv.as_arg(),
            scale: self.scale,
        }
    }

    /// The block lists `cfg`'s kernels take for one sequence of all `t` tokens: forward
    /// queries, dk/dv keys, dq queries.
    pub fn one_sequence_blocks(
        &self,
        dev: &CudaDevice,
        cfg: &FlashConfig,
    ) -> Result<[DeviceTensor; 3]> {
        let cu = [0, self.t];
        let list = |rows: Option<Vec<BlockRow>>| -> Result<DeviceTensor> {
            let rows = rows.ok_or_else(|| {
                crate::DeviceError::InvalidArgument("a position does not fit in i32".into())
            })?;
            block_tensor(dev, &rows)
        };
        Ok([
            list(query_blocks(&cu, cfg.fwd_bm()))?,
            list(key_blocks(&cu, cfg.dkdv_bn()))?,
            list(query_blocks(&cu, cfg.dq_bm()))?,
        ])
    }
}
