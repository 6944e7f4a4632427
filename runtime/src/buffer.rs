//! Device tensors: a contiguous row-major buffer with its element type and dims.

use crate::device::CudaDevice;
use crate::encode::{decode, decode_i32, encode, encode_i32, poison_bits};
use crate::error::{failed, DeviceError, Result};
use cudarc::driver::{sys, CudaSlice, DevicePtr, DevicePtrMut};
use lexp_compiler::dtype::Storage;
use lexp_compiler::launch::TensorArg;
use tracing::trace;

/// A tensor in device memory: contiguous, row-major (last dim fastest), of one [`Storage`]
/// type, owned (freed, in stream order, on drop).
///
/// Host data goes in and out as f32 (rounded to the storage type on the way in, widened on the
/// way out), which is how tests and the CPU reference compare results. Kernels see the tensor
/// through [`DeviceTensor::as_arg`] and its variants. All copies run on the stream of the
/// device the tensor was made on.
pub struct DeviceTensor {
    /// At least `bytes()` long (one byte when empty: the driver refuses 0-byte allocations).
    buf: CudaSlice<u8>,
    dtype: Storage,
    dims: Vec<usize>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("dtype", &self.dtype)
            .field("dims", &self.dims)
            .finish()
    }
}

/// Number of elements of `dims`, or a shape error on overflow.
fn checked_numel(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| DeviceError::Shape(format!("dims {dims:?} overflow usize")))
}

impl DeviceTensor {
    /// Allocates without initialising (every constructor fills the buffer next).
    fn alloc(dev: &CudaDevice, dtype: Storage, dims: &[usize], zeroed: bool) -> Result<Self> {
        let numel = checked_numel(dims)?;
        let bytes = numel
            .checked_mul(dtype.bytes())
            .ok_or_else(|| DeviceError::Shape(format!("dims {dims:?} overflow usize")))?;
        let context = || format!("allocating {bytes} bytes for a {} tensor", dtype.name());
        let len = bytes.max(1);
        let buf = if zeroed {
            dev.stream()
                .alloc_zeros::<u8>(len)
                .map_err(failed(context()))?
        } else {
            // SAFETY: `u8` has no invalid bit patterns and the caller overwrites the buffer.
            unsafe { dev.stream().alloc::<u8>(len) }.map_err(failed(context()))?
        };
        Ok(DeviceTensor {
            buf,
            dtype,
            dims: dims.to_vec(),
        })
    }

    /// A tensor of `dims` holding `data` (row-major) rounded to `dtype`.
    pub fn from_f32(
        dev: &CudaDevice,
        dtype: Storage,
        dims: &[usize],
        data: &[f32],
    ) -> Result<Self> {
        let mut t = DeviceTensor::alloc(dev, dtype, dims, false)?;
        t.write_f32(data)?;
        Ok(t)
    }

    /// An i32 tensor of `dims` holding `data` (indices, offsets).
    pub fn from_i32(dev: &CudaDevice, dims: &[usize], data: &[i32]) -> Result<Self> {
        let mut t = DeviceTensor::alloc(dev, Storage::I32, dims, false)?;
        t.write_bytes(&encode_i32(data))?;
        Ok(t)
    }

    /// A tensor of `dims` holding the raw little-endian element bytes `bytes`.
    pub fn from_bytes(
        dev: &CudaDevice,
        dtype: Storage,
        dims: &[usize],
        bytes: &[u8],
    ) -> Result<Self> {
        let mut t = DeviceTensor::alloc(dev, dtype, dims, false)?;
        t.write_bytes(bytes)?;
        Ok(t)
    }

    /// A tensor of `dims` filled with zeros.
    pub fn zeros(dev: &CudaDevice, dtype: Storage, dims: &[usize]) -> Result<Self> {
        DeviceTensor::alloc(dev, dtype, dims, true)
    }

    /// A tensor of `dims` filled with [`DeviceTensor::poison`]'s NaN pattern.
    pub fn poisoned(dev: &CudaDevice, dtype: Storage, dims: &[usize]) -> Result<Self> {
        let mut t = DeviceTensor::alloc(dev, dtype, dims, false)?;
        t.poison()?;
        Ok(t)
    }

    /// Overwrites the whole tensor with `data` (row-major, `numel` values) rounded to its type.
    pub fn write_f32(&mut self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(DeviceError::Shape(format!(
                "{} values for a tensor of dims {:?} ({} elements)",
                data.len(),
                self.dims,
                self.numel()
            )));
        }
        self.write_bytes(&encode(self.dtype, data))
    }

    /// Overwrites the whole tensor with raw element bytes (exactly `bytes()` of them).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let n = self.bytes();
        if bytes.len() != n {
            return Err(DeviceError::Shape(format!(
                "{} bytes for a {} tensor of dims {:?} ({n} bytes)",
                bytes.len(),
                self.dtype.name(),
                self.dims
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let stream = self.buf.stream().clone();
        stream
            .memcpy_htod(bytes, &mut self.buf.slice_mut(..n))
            .map_err(failed(format!("uploading {n} bytes")))
    }

    /// Downloads the raw element bytes (waits for queued work on the stream).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.bytes();
        if n == 0 {
            return Ok(Vec::new());
        }
        let stream = self.buf.stream();
        let context = || format!("downloading {n} bytes");
        let out = stream
            .clone_dtoh(&self.buf.slice(..n))
            .map_err(failed(context()))?;
        stream.synchronize().map_err(failed(context()))?;
        Ok(out)
    }

    /// Downloads the values widened to f32, row-major.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(decode(self.dtype, &self.to_bytes()?))
    }

    /// Downloads the values of an i32 tensor.
    pub fn to_i32_vec(&self) -> Result<Vec<i32>> {
        if self.dtype != Storage::I32 {
            return Err(DeviceError::Shape(format!(
                "to_i32_vec on a {} tensor",
                self.dtype.name()
            )));
        }
        Ok(decode_i32(&self.to_bytes()?))
    }

    /// Fills every element with a NaN bit pattern of the tensor's type (see
    /// [`crate::encode::poison_bits`]), so that an output element a kernel fails to write is
    /// caught by the comparison with the reference.
    pub fn poison(&mut self) -> Result<()> {
        let numel = self.numel();
        if numel == 0 {
            return Ok(());
        }
        let bits = poison_bits(self.dtype);
        let stream = self.buf.stream().clone();
        let context = || format!("poisoning {numel} {} elements", self.dtype.name());
        stream
            .context()
            .bind_to_thread()
            .map_err(failed(context()))?;
        let (ptr, _sync) = self.buf.device_ptr_mut(&stream);
        // SAFETY: the buffer holds `numel` elements of `dtype.bytes()` bytes at `ptr`, which
        // is aligned to the allocation granularity; the memset is ordered on the stream.
        let status = unsafe {
            match self.dtype.bytes() {
                2 => sys::cuMemsetD16Async(ptr, bits as u16, numel, stream.cu_stream()),
                _ => sys::cuMemsetD32Async(ptr, bits, numel, stream.cu_stream()),
            }
        };
        status.result().map_err(failed(context()))
    }

    /// Fills every element with zero bits (0.0 for every float type).
    pub fn fill_zero(&mut self) -> Result<()> {
        let stream = self.buf.stream().clone();
        stream
            .memset_zeros(&mut self.buf)
            .map_err(failed("zeroing a tensor"))
    }

    /// Copies `src` (same type and element count) into this tensor, on the device.
    pub fn copy_from(&mut self, src: &DeviceTensor) -> Result<()> {
        if src.dtype != self.dtype || src.numel() != self.numel() {
            return Err(DeviceError::Shape(format!(
                "copy of a {} tensor {:?} into a {} tensor {:?}",
                src.dtype.name(),
                src.dims,
                self.dtype.name(),
                self.dims
            )));
        }
        let n = self.bytes();
        if n == 0 {
            return Ok(());
        }
        let stream = self.buf.stream().clone();
        stream
            .memcpy_dtod(&src.buf.slice(..n), &mut self.buf.slice_mut(..n))
            .map_err(failed(format!("copying {n} bytes on the device")))
    }

    /// Device address of element 0.
    pub fn device_ptr(&self) -> u64 {
        let (ptr, _sync) = self.buf.device_ptr(self.buf.stream());
        ptr
    }

    /// The tensor as a kernel argument (contiguous strides).
    pub fn as_arg(&self) -> TensorArg {
        TensorArg::contiguous(self.device_ptr(), self.dtype, &self.dims)
    }

    /// The same memory as a kernel argument of other `dims` with the same element count.
    pub fn view(&self, dims: &[usize]) -> Result<TensorArg> {
        if checked_numel(dims)? != self.numel() {
            return Err(DeviceError::Shape(format!(
                "cannot view a tensor of dims {:?} as {dims:?}",
                self.dims
            )));
        }
        Ok(TensorArg::contiguous(self.device_ptr(), self.dtype, dims))
    }

    /// A contiguous kernel argument of `dims` starting `elements` elements into this tensor
    /// (which must hold all of it). Tests use it to hand kernels pointers that are only
    /// element-aligned.
    pub fn offset_arg(&self, elements: usize, dims: &[usize]) -> Result<TensorArg> {
        let end = checked_numel(dims)?.checked_add(elements);
        if end.is_none_or(|end| end > self.numel()) {
            return Err(DeviceError::Shape(format!(
                "offset {elements} + dims {dims:?} exceed a tensor of {} elements",
                self.numel()
            )));
        }
        let ptr = self.device_ptr() + (elements * self.dtype.bytes()) as u64;
        trace!(elements, ?dims, ptr, "offset tensor argument");
        Ok(TensorArg::contiguous(ptr, self.dtype, dims))
    }

    /// Element type.
    pub fn dtype(&self) -> Storage {
        self.dtype
    }

    /// Extent of each dimension.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// Size of the elements in bytes (`numel * dtype.bytes()`).
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.bytes()
    }

    /// The underlying cudarc buffer (at least `bytes()` long).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.buf
    }

    /// The underlying cudarc buffer, mutably.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.buf
    }
}
