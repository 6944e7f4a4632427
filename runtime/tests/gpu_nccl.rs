//! The NCCL communicator on one GPU (`dist::NcclComm`): libnccl loads, rank 0 creates the
//! unique id, the communicator of a one-rank world initialises from it, and a sum all-reduce
//! of random f32 and f64 data round-trips through the device unchanged (one rank: the sum is
//! the input). A two-GPU run needs two devices (`lexp finetune --gpus 2`). Opt-in: does nothing
//! unless `LEXP_GPU_TESTS=1`.

use lexp_runtime::data::SplitMix64;
use lexp_runtime::dist::{nccl, rendezvous, Communicator, NcclComm, RendezvousConfig, World};

#[test]
fn nccl_communicator_initialises_and_reduces_on_one_gpu() {
    if std::env::var("LEXP_GPU_TESTS").as_deref() != Ok("1") {
        eprintln!("skipped: set LEXP_GPU_TESTS=1 to run on a GPU");
        return;
    }
    assert!(
        nccl::available(),
        "libnccl.so is not on LD_LIBRARY_PATH (bench/parity/gpu_step_checks.sh links it)"
    );
    let world = World::single();
    let blob = nccl::unique_id_blob().expect("an NCCL unique id");
    assert_eq!(blob.len(), nccl::ID_BYTES);
    assert!(blob.iter().any(|&b| b != 0), "the id is all zeros");
    let (group, got) =
        rendezvous::rendezvous(&world, None, &blob, &RendezvousConfig::from_env()).unwrap();
    let mut comm = NcclComm::new(group, &got, 0).expect("an NCCL communicator");
    assert_eq!((comm.rank(), comm.world_size()), (0, 1));
    let mut rng = SplitMix64::new(3);
    let want: Vec<f32> = (0..100_003)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let mut data = want.clone();
    comm.all_reduce_sum(&mut data).unwrap();
    assert_eq!(data, want);
    let want64: Vec<f64> = want.iter().map(|&x| f64::from(x) * 1e3).collect();
    let mut data64 = want64.clone();
    comm.all_reduce_sum_f64(&mut data64).unwrap();
    assert_eq!(data64, want64);
    comm.barrier().unwrap();
    assert!(NcclComm::new(
        rendezvous::rendezvous(&world, None, &[], &RendezvousConfig::from_env())
            .unwrap()
            .0,
        &[1, 2, 3],
        0
    )
    .is_err());
    println!("NCCL: one-rank communicator, all-reduce of 100003 f32 and f64 round-trips exactly");
}
