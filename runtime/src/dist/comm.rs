//! [`Communicator`]: the collectives data-parallel training needs (sum all-reduce of the
//! gradients and of the loss sums, barrier), and [`TcpComm`], the CPU reference that runs
//! them over the rendezvous sockets. An NCCL communicator (GPU buffers, the unique id from
//! the rendezvous blob) implements the same trait.

use super::rendezvous::Group;
use super::wire::{self, Header, Kind};
use super::DistError;
use crate::DeviceTensor;
use cudarc::driver::CudaStream;
use std::time::Instant;

/// Collectives over the ranks of a run. Every rank must call the same collectives, with the
/// same lengths, in the same order; a mismatch or a dead or silent peer is an error (never a
/// hang).
pub trait Communicator: Send {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Replaces `data` on every rank with the element-wise sum over the ranks.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError>;
    /// [`all_reduce_sum`](Self::all_reduce_sum) in f64 (loss sums, counts, flags).
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<(), DistError>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<(), DistError>;
    /// The collectives on device buffers, when this communicator has them (NCCL): the GPU
    /// engine then reduces its gradients where they are, with no host round trip.
    fn device_collectives(&mut self) -> Option<&mut dyn DeviceCollectives> {
        None
    }
    /// Milliseconds spent in collectives since the last call (device all-reduces timed by
    /// events once their stream has finished, host collectives by the wall clock); `None`
    /// when this communicator does not time them.
    fn take_comm_ms(&mut self) -> Option<f64> {
        None
    }
}

/// Sum all-reduce of a device buffer, ordered on the caller's stream: it starts after the
/// work queued on `stream` so far and the work queued after the call starts after it.
pub trait DeviceCollectives {
    /// Replaces the f32 tensor `t` on every rank with the element-wise sum over the ranks.
    ///
    /// # Errors
    /// [`DistError::Launch`] if `t` is not f32, or NCCL or the driver refuses the call.
    fn all_reduce_sum_tensor(
        &mut self,
        stream: &CudaStream,
        t: &mut DeviceTensor,
    ) -> Result<(), DistError>;
}

/// The communicator of a process alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleComm;

impl Communicator for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&mut self, _data: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }
}

/// An element type the TCP collectives carry.
trait Elem: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    fn get(b: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> Self {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[..8]);
        f64::from_le_bytes(w)
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

/// The CPU reference communicator (gloo-like): a star through rank 0 over the rendezvous
/// connections. Rank 0 sums the ranks' buffers in rank order (`((x₀ + x₁) + x₂) + …`, the
/// same bits on every run) and sends the sum back; every read and write has the group's
/// collective timeout.
pub struct TcpComm {
    group: Group,
    /// Collectives done so far (each message carries it, so that ranks out of step are caught).
    seq: u64,
    /// Wall-clock milliseconds in collectives since [`Communicator::take_comm_ms`].
    ms: f64,
}

impl TcpComm {
    /// The communicator over a joined group ([`super::rendezvous::rendezvous`]).
    pub fn new(group: Group) -> TcpComm {
        TcpComm {
            group,
            seq: 0,
            ms: 0.0,
        }
    }

    fn collective<T: Elem>(&mut self, kind: Kind, data: &mut [T]) -> Result<(), DistError> {
        let t0 = Instant::now();
        let out = self.exchange(kind, data);
        self.ms += t0.elapsed().as_secs_f64() * 1e3;
        out
    }

    fn exchange<T: Elem>(&mut self, kind: Kind, data: &mut [T]) -> Result<(), DistError> {
        self.seq += 1;
        let world = &self.group.world;
        if world.world_size == 1 {
            return Ok(());
        }
        let (rank, seq, len) = (world.rank, self.seq, data.len() as u64);
        let what = format!("{} #{seq} ({len} elements)", name(kind));
        let t0 = Instant::now();
        let deadline = t0 + self.group.op_timeout;
        let header = Header { kind, seq, len };
        let peer_err = |peer: usize, detail: String| DistError::Peer {
            rank,
            peer,
            what: what.clone(),
            elapsed: t0.elapsed(),
            detail,
        };
        let mut payload = vec![0u8; data.len() * T::SIZE];
        if rank == 0 {
            // Gather in rank order, summing as the buffers arrive.
            for (peer, link) in self.group.links.iter_mut().enumerate() {
                let Some(stream) = link else { continue };
                let got = wire::recv_header(stream, deadline)
                    .map_err(|e| peer_err(peer, e.to_string()))?;
                check(rank, peer, header, got)?;
                wire::read_exact_by(stream, &mut payload, deadline)
                    .map_err(|e| peer_err(peer, e.to_string()))?;
                for (x, b) in data.iter_mut().zip(payload.chunks_exact(T::SIZE)) {
                    *x = x.add(T::get(b));
                }
            }
            let mut out = Vec::with_capacity(payload.len());
            data.iter().for_each(|x| x.put(&mut out));
            for (peer, link) in self.group.links.iter_mut().enumerate() {
                let Some(stream) = link else { continue };
                wire::send(stream, header, &out, deadline)
                    .map_err(|e| peer_err(peer, e.to_string()))?;
            }
        } else {
            let Some(stream) = self.group.links[0].as_mut() else {
                return Err(peer_err(0, "no connection to rank 0".into()));
            };
            let mut out = Vec::with_capacity(payload.len());
            data.iter().for_each(|x| x.put(&mut out));
            wire::send(stream, header, &out, deadline).map_err(|e| peer_err(0, e.to_string()))?;
            let got =
                wire::recv_header(stream, deadline).map_err(|e| peer_err(0, e.to_string()))?;
            check(rank, 0, header, got)?;
            wire::read_exact_by(stream, &mut payload, deadline)
                .map_err(|e| peer_err(0, e.to_string()))?;
            for (x, b) in data.iter_mut().zip(payload.chunks_exact(T::SIZE)) {
                *x = T::get(b);
            }
        }
        Ok(())
    }
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::SumF32 => "all-reduce (f32)",
        Kind::SumF64 => "all-reduce (f64)",
        Kind::Barrier => "barrier",
        Kind::Hello | Kind::Blob => "rendezvous",
    }
}

/// Both sides must be in the same collective.
fn check(rank: usize, peer: usize, want: Header, got: Header) -> Result<(), DistError> {
    if got == want {
        return Ok(());
    }
    Err(DistError::Mismatch {
        rank,
        peer,
        detail: format!(
            "this rank is in {} #{} of {} elements, rank {peer} in {} #{} of {} elements",
            name(want.kind),
            want.seq,
            want.len,
            name(got.kind),
            got.seq,
            got.len
        ),
    })
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.group.world.rank
    }
    fn world_size(&self) -> usize {
        self.group.world.world_size
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError> {
        self.collective(Kind::SumF32, data)
    }
    fn all_reduce_sum_f64(&mut self, data: &mut [f64]) -> Result<(), DistError> {
        self.collective(Kind::SumF64, data)
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.collective::<f32>(Kind::Barrier, &mut [])
    }
    fn take_comm_ms(&mut self) -> Option<f64> {
        Some(std::mem::take(&mut self.ms))
    }
}
