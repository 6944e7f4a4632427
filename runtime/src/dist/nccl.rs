//! [`NcclComm`]: the collectives of data-parallel training on GPUs, through NCCL (cudarc's
//! bindings, the library loaded at run time). Rank 0 creates the NCCL unique id and hands it
//! to the others in the rendezvous blob ([`unique_id_blob`], [`NcclComm::new`]).
//!
//! Two kinds of collectives:
//! - [`DeviceCollectives`]: the GPU engine's gradient buffer is all-reduced in place on the
//!   device (the data-parallel step of [`crate::gpu::GpuEngine`]). NCCL runs on its own stream,
//!   joined to the caller's stream before and after, and each call is timed by two events.
//! - The [`Communicator`] trait's host-slice collectives (the loss sums, the host optimizer
//!   path): each call copies the slice to the device, all-reduces it there, and copies it back.
//!
//! The TCP group of the rendezvous stays open for the barrier.
//!
//! NCCL blocks in a collective whose peer died or hangs. A dead worker is seen by the
//! `--gpus` launcher, which stops the others (`launch`) within seconds; a hung one by the
//! [`Watchdog`], which ends this worker once a collective has waited longer than the
//! group's collective timeout.

use super::comm::{Communicator, DeviceCollectives};
use super::rendezvous::Group;
use super::watchdog::Watchdog;
use super::{DistError, TcpComm};
use crate::DeviceTensor;
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use lexp_compiler::dtype::Storage;
use std::sync::Arc;
use std::time::Instant;

/// Bytes of an NCCL unique id in the rendezvous blob.
pub const ID_BYTES: usize = 128;

fn nccl_err(what: &str) -> impl FnOnce(String) -> DistError + '_ {
    move |e| DistError::Launch(format!("NCCL {what}: {e}"))
}

/// Whether libnccl can be loaded (it is looked up as `libnccl.so`; the pip wheel
/// `nvidia-nccl-cu13` ships `libnccl.so.2`, so a `libnccl.so` link to it must be on
/// `LD_LIBRARY_PATH`).
pub fn available() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// The loaded library's version (`2.28.9`), when it loads.
pub fn version() -> Option<String> {
    if !available() {
        return None;
    }
    let v = cudarc::nccl::result::get_nccl_version().ok()?;
    // NCCL_VERSION_CODE: major·10000 + minor·100 + patch since 2.9.
    Some(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

fn require_library() -> Result<(), DistError> {
    if available() {
        Ok(())
    } else {
        Err(DistError::Launch(
            "libnccl.so not found: data-parallel training on GPUs needs NCCL (pip install \
             nvidia-nccl-cu13, then put a libnccl.so link to its lib/libnccl.so.2 on \
             LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

/// Rank 0: a fresh NCCL unique id as the rendezvous blob.
///
/// # Errors
/// [`DistError::Launch`] if NCCL is missing or fails.
pub fn unique_id_blob() -> Result<Vec<u8>, DistError> {
    require_library()?;
    let id = Id::new()
        .map_err(|e| format!("{e:?}"))
        .map_err(nccl_err("unique id"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// An NCCL communicator owned by one [`NcclComm`].
struct OwnedComm(Comm);

// SAFETY: NCCL communicators may be used from any thread as long as calls on one communicator
// are not concurrent; `OwnedComm` is only reached through `&mut NcclComm` (the trait's
// collectives), so calls are serialised by the borrow.
unsafe impl Send for OwnedComm {}

/// Sum all-reduces over NCCL on device `ordinal` (see the module doc).
pub struct NcclComm {
    comm: OwnedComm,
    /// NCCL's own stream (joined to the caller's around a device collective).
    stream: Arc<CudaStream>,
    tcp: TcpComm,
    /// Start and end events of the device all-reduces not yet read by `take_comm_ms`.
    pending: Vec<(CudaEvent, CudaEvent)>,
    /// Wall-clock milliseconds of host collectives since `take_comm_ms`.
    host_ms: f64,
    /// Bounds the wait of every collective (armed when queued, disarmed once complete).
    watchdog: Watchdog,
    /// Collectives queued so far (named in the watchdog's report).
    calls: u64,
    /// Device staging of the host collectives, grown to the largest seen (no allocation per
    /// step once warm).
    staging: Option<CudaSlice<u8>>,
    /// Timing events read by `take_comm_ms`, for reuse.
    spare_events: Vec<CudaEvent>,
}

impl NcclComm {
    /// Joins the NCCL communicator of `group`'s ranks with the unique id `blob` (from rank 0's
    /// [`unique_id_blob`], received in the rendezvous), on device `ordinal`.
    ///
    /// # Errors
    /// [`DistError::Launch`] if the blob is not an id, NCCL is missing, or the communicator
    /// cannot be created.
    pub fn new(group: Group, blob: &[u8], ordinal: usize) -> Result<NcclComm, DistError> {
        require_library()?;
        let bytes: [u8; ID_BYTES] = blob.try_into().map_err(|_| {
            DistError::Launch(format!(
                "the rendezvous blob has {} bytes, an NCCL id {ID_BYTES}",
                blob.len()
            ))
        })?;
        let id = Id::uninit(bytes.map(|b| b as ::core::ffi::c_char));
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| DistError::Launch(format!("CUDA device {ordinal}: {e}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| DistError::Launch(format!("CUDA device {ordinal}: a stream: {e}")))?;
        let (rank, world) = (group.world().rank, group.world().world_size);
        let watchdog = Watchdog::start(rank, group.op_timeout);
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| format!("{e:?}"))
            .map_err(nccl_err("communicator init"))?;
        Ok(NcclComm {
            comm: OwnedComm(comm),
            stream,
            tcp: TcpComm::new(group),
            pending: Vec::new(),
            host_ms: 0.0,
            watchdog,
            calls: 0,
            staging: None,
            spare_events: Vec::new(),
        })
    }

    fn reduce<T>(&mut self, data: &mut [T]) -> Result<(), DistError>
    where
        T: cudarc::driver::DeviceRepr + cudarc::nccl::NcclType,
    {
        if data.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.arm("host all-reduce", data.len());
        let dev = |e: cudarc::driver::DriverError| DistError::Launch(format!("NCCL buffer: {e}"));
        let bytes = std::mem::size_of_val(data);
        let staging = match self.staging.take() {
            Some(b) if b.len() >= bytes => b,
            _ => self.stream.alloc_zeros::<u8>(bytes).map_err(dev)?,
        };
        let buf = self.staging.insert(staging);
        // SAFETY: the staging buffer holds at least `bytes` = `data.len()` values of `T`, and
        // the device allocation is aligned for any element type.
        let mut view = unsafe { buf.transmute_mut::<T>(data.len()) }.ok_or_else(|| {
            DistError::Launch(format!("NCCL staging: too small for {} values", data.len()))
        })?;
        self.stream.memcpy_htod(data, &mut view).map_err(dev)?;
        self.comm
            .0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| format!("{e:?}"))
            .map_err(nccl_err("all-reduce"))?;
        self.stream.memcpy_dtoh(&view, data).map_err(dev)?;
        self.stream.synchronize().map_err(dev)?;
        // NCCL's stream is in order: every collective queued before this one is done too.
        self.watchdog.disarm();
        self.host_ms += t0.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    fn arm(&mut self, what: &'static str, len: usize) {
        self.calls += 1;
        let n = self.calls;
        self.watchdog
            .arm(|| format!("NCCL {what} #{n} ({len} elements)"));
    }

    /// A timing event: a spare one, else a new one.
    fn timing_event(&mut self) -> Result<CudaEvent, DistError> {
        if let Some(e) = self.spare_events.pop() {
            return Ok(e);
        }
        self.stream
            .context()
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| DistError::Launch(format!("NCCL timing event: {e}")))
    }
}

impl DeviceCollectives for NcclComm {
    fn all_reduce_sum_tensor(
        &mut self,
        stream: &CudaStream,
        t: &mut DeviceTensor,
    ) -> Result<(), DistError> {
        if t.dtype() != Storage::F32 {
            return Err(DistError::Launch(format!(
                "device all-reduce of a {:?} tensor: only f32 is reduced",
                t.dtype()
            )));
        }
        let n = t.numel();
        if n == 0 {
            return Ok(());
        }
        let drv = |what: &'static str| {
            move |e: cudarc::driver::DriverError| {
                DistError::Launch(format!("NCCL device all-reduce: {what}: {e}"))
            }
        };
        let (start, end) = (self.timing_event()?, self.timing_event()?);
        self.arm("device all-reduce", n);
        self.stream
            .join(stream)
            .map_err(drv("waiting for the gradients"))?;
        start.record(&self.stream).map_err(drv("start event"))?;
        // SAFETY: the tensor holds at least `numel` f32 values (its bytes are 4·numel), and
        // it is not touched by other work until the caller's stream joins NCCL's below.
        let mut view = unsafe { t.slice_mut().transmute_mut::<f32>(n) }.ok_or_else(|| {
            DistError::Launch(format!("device all-reduce: a buffer too small for {n} f32"))
        })?;
        self.comm
            .0
            .all_reduce_in_place(&mut view, &ReduceOp::Sum)
            .map_err(|e| format!("{e:?}"))
            .map_err(nccl_err("device all-reduce"))?;
        end.record(&self.stream).map_err(drv("end event"))?;
        stream
            .join(&self.stream)
            .map_err(drv("ordering after it"))?;
        self.pending.push((start, end));
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.comm.0.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.0.world_size()
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.reduce(data)
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<(), DistError> {
        self.reduce(data)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.tcp.barrier()
    }
    fn device_collectives(&mut self) -> Option<&mut dyn DeviceCollectives> {
        Some(self)
    }
    /// Waits for the pending device all-reduces' end events (the caller's step has normally
    /// synchronised already) and adds their spans to the host collectives' time.
    fn take_comm_ms(&mut self) -> Option<f64> {
        let mut ms = Some(std::mem::take(&mut self.host_ms));
        for (start, end) in std::mem::take(&mut self.pending) {
            match start.elapsed_ms(&end) {
                Ok(t) => ms = ms.map(|m| m + f64::from(t)),
                Err(e) => {
                    tracing::warn!("NCCL timing events: {e}");
                    ms = None;
                }
            }
            self.spare_events.extend([start, end]);
        }
        // Every queued collective has finished (or failed): nothing left to watch.
        self.watchdog.disarm();
        ms
    }
}
