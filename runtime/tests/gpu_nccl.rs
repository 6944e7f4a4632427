//! The NCCL communicator on one GPU (`dist::NcclComm`): libnccl loads, rank 0 creates the
//! unique id, the communicator of a one-rank world initialises from it, and a sum all-reduce
//! of random f32 and f64 data round-trips through the device unchanged (one rank: the sum is
//! the input). The device path: a random f32 tensor all-reduced on the device round-trips
//! (timed by events), a bf16 one is refused, and the GPU engine's data-parallel step over a
//! one-rank NCCL world (gradients reduced on the device) is bit for bit its plain optimizer
//! step. A two-GPU run needs two devices (`lexp finetune --gpus 2`, `lexp bench step --gpus
//! 2`). Opt-in: does nothing unless `LEXP_GPU_TESTS=1`.

mod common;

use common::gpu::{assets, batch, device, random_lora};
use lexp_compiler::dtype::Storage;
use lexp_runtime::checkpoint::OptModel;
use lexp_runtime::data::SplitMix64;
use lexp_runtime::dist::{
    nccl, rendezvous, Communicator, DataParallel, NcclComm, RendezvousConfig, World,
};
use lexp_runtime::gpu::GpuEngine;
use lexp_runtime::optim::{AdamW, AdamWConfig};
use lexp_runtime::train::{Engine, OptimStep};
use lexp_runtime::DeviceTensor;

fn one_rank_nccl() -> NcclComm {
    let world = World::single();
    let blob = nccl::unique_id_blob().expect("an NCCL unique id");
    let (group, got) =
        rendezvous::rendezvous(&world, None, &blob, &RendezvousConfig::from_env()).unwrap();
    NcclComm::new(group, &got, 0).expect("an NCCL communicator")
}

#[test]
fn device_all_reduce_and_the_engines_data_parallel_step_on_one_gpu() {
    if !common::gpu::enabled() {
        return;
    }
    assert!(nccl::available(), "libnccl.so is not on LD_LIBRARY_PATH");
    let dev = device();
    let mut comm = one_rank_nccl();
    let mut rng = SplitMix64::new(5);
    let want: Vec<f32> = (0..70_001)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let mut t = DeviceTensor::from_f32(&dev, Storage::F32, &[want.len()], &want).unwrap();
    let dc = comm
        .device_collectives()
        .expect("NCCL has device collectives");
    dc.all_reduce_sum_tensor(dev.stream(), &mut t).unwrap();
    let mut h = DeviceTensor::from_f32(&dev, Storage::BF16, &[8], &want[..8]).unwrap();
    assert!(
        dc.all_reduce_sum_tensor(dev.stream(), &mut h).is_err(),
        "bf16 refused"
    );
    assert_eq!(
        t.to_f32_vec().unwrap(),
        want,
        "one rank: the sum is the input"
    );
    let ms = comm.take_comm_ms().expect("NCCL times its collectives");
    assert!(ms > 0.0 && ms.is_finite(), "all-reduce time {ms}");
    assert_eq!(comm.take_comm_ms(), Some(0.0), "taken once");

    // The engine's step over a one-rank NCCL world against its plain step: same micro-batches,
    // same adapter, same AdamW; the device all-reduce of one rank is the identity.
    let dir = assets().join("opt-tiny");
    let model = OptModel::load(&dir).unwrap();
    let micro = [
        batch(&dir, &[0, 1, 2]),
        batch(&dir, &[3, 4]),
        batch(&dir, &[5]),
    ];
    let step = OptimStep {
        batches: &micro,
        dropout: None,
        lr: 1e-3,
        max_grad_norm: 1.0,
    };
    let lora0 = random_lora(&model, 4, 9);
    let sizes: Vec<usize> = lora0.tensors().iter().map(|(_, m)| m.data.len()).collect();
    let adamw = || {
        AdamW::new(
            AdamWConfig {
                lr: 1e-3,
                betas: (0.9, 0.999),
                eps: 1e-8,
                weight_decay: 0.01,
            },
            &sizes,
        )
    };
    let mut plain = GpuEngine::new(model.clone(), device()).unwrap();
    let mut dp = DataParallel::new(
        Box::new(GpuEngine::new(model, device()).unwrap()),
        Box::new(comm),
    );
    let (mut la, mut lb) = (lora0.clone(), lora0);
    let (mut aa, mut ab) = (adamw(), adamw());
    for i in 0..3 {
        let a = plain.optimizer_step(&mut la, &mut aa, &step).unwrap();
        let b = dp.optimizer_step(&mut lb, &mut ab, &step).unwrap();
        assert!(
            a.applied && a.loss.is_finite() && a.grad_norm > 0.0,
            "step {i}: {a:?}"
        );
        assert_eq!(a, b, "step {i}: plain vs data-parallel outcome");
        for ((name, x), (_, y)) in la.tensors().iter().zip(lb.tensors()) {
            assert_eq!(x.data, y.data, "step {i}: {name}");
        }
        let comm_ms = dp.last_comm_ms().expect("the step's collectives are timed");
        assert!(comm_ms > 0.0, "step {i}: collectives {comm_ms} ms");
    }
    println!("NCCL device path: all-reduce exact, 3 data-parallel steps equal the plain ones");
}

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
