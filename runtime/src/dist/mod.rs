//! Data-parallel training across processes (issue 9): the CPU-testable groundwork.
//!
//! One worker process per device (GPU, or a CPU slot with `lexp finetune --workers N`); the
//! same binary also runs under an external launcher that sets torchrun's variables, so
//! multi-node runs take the same path.
//!
//! - [`world`]: who this process is ([`World`], from `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `MASTER_ADDR`, `MASTER_PORT`).
//! - [`rendezvous`]: rank 0 listens, the others connect; rank 0 broadcasts a blob (where the
//!   NCCL unique id goes); every socket operation has a deadline.
//! - [`comm`]: the [`Communicator`] trait (sum all-reduce, barrier) and [`TcpComm`], the CPU
//!   reference (a star through rank 0, deterministic rank-order sums).
//! - [`nccl`]: [`NcclComm`], the same trait over NCCL for GPU workers (the unique id travels
//!   in the rendezvous blob).
//! - [`shard`]: which micro-batches of a global optimizer step each rank computes.
//! - [`step`]: [`data_parallel_step`] (local gradients, all-reduce, the same clip and AdamW on
//!   every rank) and the [`DataParallel`] engine wrapper the trainer runs.
//! - [`watchdog`]: bounds the wait of an NCCL collective (a hung peer ends the run with an
//!   error instead of a silent hang).
//! - [`launch`]: the local launcher (`--workers N` / `--gpus N`): spawns the workers,
//!   supervises them, stops them all when one fails.

pub mod comm;
mod error;
pub mod launch;
pub mod nccl;
pub mod rendezvous;
pub mod shard;
pub mod step;
pub mod watchdog;
mod wire;
pub mod world;

pub use comm::{Communicator, DeviceCollectives, SingleComm, TcpComm};
pub use error::DistError;
pub use nccl::NcclComm;
pub use rendezvous::{Group, RendezvousConfig};
pub use step::{data_parallel_step, DataParallel};
pub use world::World;

#[cfg(test)]
mod tests;
