//! [`NcclComm`]: the collectives of data-parallel training on GPUs, through NCCL (cudarc's
//! bindings, the library loaded at run time). Rank 0 creates the NCCL unique id and hands it
//! to the others in the rendezvous blob ([`unique_id_blob`], [`NcclComm::new`]).
//!
//! The trait's collectives take host slices (the engine's gradients as the data-parallel step
//! sees them): each call copies the slice to the device, all-reduces it there over NVLink/PCIe,
//! and copies it back. The TCP group of the rendezvous stays open for the barrier.
//!
//! NCCL blocks in a collective whose peer died; the `--gpus` launcher then stops the other
//! workers (`launch`), so a dead worker still ends the run within seconds.

use super::comm::Communicator;
use super::rendezvous::Group;
use super::{DistError, TcpComm};
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::sync::Arc;

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
    stream: Arc<CudaStream>,
    tcp: TcpComm,
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
        let stream = ctx.default_stream();
        let (rank, world) = (group.world().rank, group.world().world_size);
        let comm = Comm::from_rank(stream.clone(), rank, world, id)
            .map_err(|e| format!("{e:?}"))
            .map_err(nccl_err("communicator init"))?;
        Ok(NcclComm {
            comm: OwnedComm(comm),
            stream,
            tcp: TcpComm::new(group),
        })
    }

    fn reduce<T>(&mut self, data: &mut [T]) -> Result<(), DistError>
    where
        T: cudarc::driver::DeviceRepr + cudarc::nccl::NcclType,
    {
        if data.is_empty() {
            return Ok(());
        }
        let dev = |e: cudarc::driver::DriverError| DistError::Launch(format!("NCCL buffer: {e}"));
        let mut buf = self.stream.clone_htod(data).map_err(dev)?;
        self.comm
            .0
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| format!("{e:?}"))
            .map_err(nccl_err("all-reduce"))?;
        self.stream.memcpy_dtoh(&buf, data).map_err(dev)?;
        self.stream.synchronize().map_err(dev)
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
}
