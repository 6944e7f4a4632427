//! Rendezvous, collectives and the data-parallel step with workers as threads on loopback
//! sockets (port 0: the OS picks, so tests never collide on a fixed port).

use super::rendezvous::rendezvous;
use super::*;
use crate::checkpoint::{OptConfig, OptModel, OptWeights};
use crate::data::{PackedBatch, SplitMix64};
use crate::model::DropoutRng;
use crate::optim::{AdamW, AdamWConfig};
use crate::peft::{LoraConfig, LoraParams, LoraTarget, PeftParams};
use crate::train::{host_optimizer_step, CpuEngine, OptimStep};
use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

fn worlds(n: usize) -> (TcpListener, Vec<World>) {
    let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    let w = (0..n)
        .map(|rank| World {
            rank,
            world_size: n,
            local_rank: rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        })
        .collect();
    (l, w)
}

fn quick() -> RendezvousConfig {
    RendezvousConfig {
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(20),
    }
}

/// Runs `f(rank, comm)` on `n` threads joined into one group with `config`; results by rank.
fn with_group<T: Send + 'static>(
    n: usize,
    config: RendezvousConfig,
    blob: Vec<u8>,
    f: impl Fn(usize, TcpComm, Vec<u8>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let (listener, worlds) = worlds(n);
    let f = std::sync::Arc::new(f);
    let mut listener = Some(listener);
    let handles: Vec<_> = worlds
        .into_iter()
        .map(|w| {
            let (f, l, blob) = (f.clone(), listener.take(), blob.clone());
            thread::spawn(move || {
                let mine = if w.rank == 0 { blob } else { Vec::new() };
                let (group, got) = rendezvous(&w, l, &mine, &config).unwrap();
                f(w.rank, TcpComm::new(group), got)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn random_f32(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0)
        .collect()
}

#[test]
fn all_reduce_sums_in_rank_order_with_two_and_three_workers() {
    for n in [2usize, 3] {
        let mut rng = SplitMix64::new(0xd15c + n as u64);
        let blob: Vec<u8> = (0..128).map(|_| rng.next_u64() as u8).collect();
        let results = with_group(n, quick(), blob.clone(), move |rank, mut comm, got| {
            assert_eq!((comm.rank(), comm.world_size()), (rank, n));
            let mut outs = Vec::new();
            // Lengths 0, 1, an odd number and one larger than a socket buffer.
            for (i, len) in [0usize, 1, 1001, 300_000].into_iter().enumerate() {
                let mut r = SplitMix64::for_stream(77, (i * 16 + rank) as u64);
                let mut x = random_f32(&mut r, len);
                comm.all_reduce_sum(&mut x).unwrap();
                outs.push(x);
            }
            let mut r = SplitMix64::for_stream(78, rank as u64);
            let mut y: Vec<f64> = random_f32(&mut r, 17)
                .iter()
                .map(|&v| v as f64 / 3.0)
                .collect();
            comm.all_reduce_sum_f64(&mut y).unwrap();
            comm.barrier().unwrap();
            (got, outs, y)
        });
        for (rank, (got, outs, y)) in results.iter().enumerate() {
            assert_eq!(got, &blob, "rank {rank} got another blob");
            // An independent naive sum in rank order.
            for (i, len) in [0usize, 1, 1001, 300_000].into_iter().enumerate() {
                let inputs: Vec<Vec<f32>> = (0..n)
                    .map(|r| random_f32(&mut SplitMix64::for_stream(77, (i * 16 + r) as u64), len))
                    .collect();
                for k in 0..len {
                    let mut s = inputs[0][k];
                    for inp in &inputs[1..] {
                        s += inp[k];
                    }
                    assert_eq!(outs[i][k].to_bits(), s.to_bits(), "n={n} rank {rank} [{k}]");
                }
            }
            let want: Vec<f64> = (0..17)
                .map(|k| {
                    (0..n)
                        .map(|r| {
                            random_f32(&mut SplitMix64::for_stream(78, r as u64), 17)[k] as f64
                                / 3.0
                        })
                        .fold(None, |acc: Option<f64>, v| Some(acc.map_or(v, |a| a + v)))
                        .unwrap()
                })
                .collect();
            assert_eq!(y, &want);
        }
    }
}

#[test]
fn a_rank_that_never_connects_is_named_within_the_timeout() {
    let (listener, worlds) = worlds(3);
    let config = RendezvousConfig {
        join_timeout: Duration::from_millis(800),
        op_timeout: Duration::from_secs(30),
    };
    let w1 = worlds[1].clone();
    let t0 = Instant::now();
    let leaf = thread::spawn(move || rendezvous(&w1, None, &[], &config).map(|_| ()));
    // Rank 2 never starts.
    let e = rendezvous(&worlds[0], Some(listener), &[1, 2, 3], &config)
        .err()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        matches!(&e, DistError::Missing { missing, .. } if missing == &vec![2]),
        "{e}"
    );
    assert!(
        e.to_string().contains("rank(s) [2]") && e.to_string().contains("timed out"),
        "{e}"
    );
    // Rank 1 learns of it at once (rank 0 closed the connection), not at its own deadline.
    let e1 = leaf.join().unwrap().unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(e1.contains("rank 1") && e1.contains("rank 0"), "{e1}");
}

#[test]
fn a_worker_without_rank_zero_gives_up_at_its_deadline() {
    // A port nobody listens on: bind one and release it.
    let port = launch::free_port().unwrap();
    let w = World {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let config = RendezvousConfig {
        join_timeout: Duration::from_millis(600),
        op_timeout: Duration::from_secs(30),
    };
    let t0 = Instant::now();
    let e = rendezvous(&w, None, &[], &config)
        .err()
        .unwrap()
        .to_string();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        e.contains("rank 1") && e.contains("rank 0") && e.contains(&format!(":{port}")),
        "{e}"
    );
}

#[test]
fn a_peer_that_dies_mid_training_is_an_error_not_a_hang() {
    let config = RendezvousConfig {
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    let results = with_group(3, config, Vec::new(), |rank, mut comm, _| {
        let mut x = vec![rank as f32; 8];
        comm.all_reduce_sum(&mut x).unwrap();
        assert_eq!(x, vec![3.0; 8]);
        if rank == 2 {
            drop(comm); // dies: its connection closes
            return None;
        }
        let mut y = vec![1.0f32; 8];
        Some(comm.all_reduce_sum(&mut y).unwrap_err().to_string())
    });
    // Long before the 60 s collective timeout.
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let e0 = results[0].as_ref().unwrap();
    assert!(
        e0.contains("rank 0") && e0.contains("rank 2") && e0.contains("#2"),
        "{e0}"
    );
    assert!(e0.contains("closed the connection"), "{e0}");
    // Rank 1 waits on rank 0, which gave up: it sees rank 0's connection close.
    let e1 = results[1].as_ref().unwrap();
    assert!(e1.contains("rank 1") && e1.contains("rank 0"), "{e1}");
}

#[test]
fn a_silent_peer_times_out_with_the_time_waited() {
    let config = RendezvousConfig {
        join_timeout: Duration::from_secs(20),
        op_timeout: Duration::from_millis(700),
    };
    let results = with_group(2, config, Vec::new(), |rank, mut comm, _| {
        if rank == 1 {
            // Hangs (alive, connection open) past rank 0's timeout.
            thread::sleep(Duration::from_millis(2500));
            return (Duration::ZERO, String::new());
        }
        let t0 = Instant::now();
        let e = comm.all_reduce_sum_f64(&mut [1.0]).unwrap_err().to_string();
        (t0.elapsed(), e)
    });
    let (took, e) = &results[0];
    assert!(
        *took >= Duration::from_millis(600) && *took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(
        e.contains("rank 1") && e.contains("timed out") && e.contains("after 0."),
        "{e}"
    );
}

#[test]
fn ranks_in_different_collectives_are_caught() {
    let results = with_group(2, quick(), Vec::new(), |rank, mut comm, _| {
        let mut x = vec![0.5f32; 3 + rank];
        comm.all_reduce_sum(&mut x).map_err(|e| e.to_string())
    });
    let e0 = results[0].as_ref().unwrap_err();
    assert!(
        e0.contains("mismatch") && e0.contains("3 elements") && e0.contains("4 elements"),
        "{e0}"
    );
    assert!(results[1].is_err());
}

// ---- the data-parallel step ----

fn tiny() -> OptConfig {
    let json = r#"{"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
                   "ffn_dim": 64, "num_attention_heads": 4, "max_position_embeddings": 64,
                   "dropout": 0.1}"#;
    OptConfig::from_json(json, std::path::Path::new("tiny.json")).unwrap()
}

fn engine() -> CpuEngine {
    let c = tiny();
    CpuEngine::new(OptModel {
        weights: OptWeights::random(&c, 11, 0.1),
        config: c,
    })
}

/// An adapter with random (non-zero) A and B, so that every gradient is non-trivial.
fn adapter() -> PeftParams {
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Fc2],
        use_rslora: false,
    };
    let mut lora = LoraParams::init(&cfg, &tiny(), 5);
    let mut rng = SplitMix64::new(6);
    for (_, m) in lora.tensors_mut() {
        let v = random_f32(&mut rng, m.data.len());
        m.data.iter_mut().zip(v).for_each(|(d, r)| *d = r * 0.05);
    }
    lora.into()
}

/// Five micro-batches of different lengths (some sequences with ignored targets).
fn batches() -> Vec<PackedBatch> {
    let mut rng = SplitMix64::new(9);
    (0..5)
        .map(|m| {
            let mut b = PackedBatch {
                cu_seqlens: vec![0],
                ..PackedBatch::default()
            };
            for s in 0..(1 + m % 3) {
                let len = 4 + (rng.below(20) as usize);
                let ids: Vec<u32> = (0..len).map(|_| rng.below(97) as u32).collect();
                for (t, &id) in ids.iter().enumerate() {
                    b.input_ids.push(id);
                    b.position_ids.push(t as u32);
                    let keep = t + 1 < len && (t + m) % 4 != 0;
                    b.targets.push(if keep { ids[t + 1] as i32 } else { -100 });
                }
                b.cu_seqlens.push(b.input_ids.len() as i32);
                b.examples.push(s);
            }
            b
        })
        .collect()
}

fn adamw(lora: &PeftParams) -> AdamW {
    let sizes: Vec<usize> = lora.tensors().iter().map(|(_, m)| m.data.len()).collect();
    AdamW::new(
        AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
        &sizes,
    )
}

const SEEDS: [DropoutRng; 5] = [
    DropoutRng { seed: 1 },
    DropoutRng { seed: 2 },
    DropoutRng { seed: 3 },
    DropoutRng { seed: 4 },
    DropoutRng { seed: 5 },
];

/// Two optimizer steps (the second sees AdamW's moments of the first) on one engine.
fn two_steps(
    run: &mut dyn FnMut(&mut PeftParams, &mut AdamW, &OptimStep<'_>) -> crate::train::StepOutcome,
) -> (Vec<crate::train::StepOutcome>, PeftParams) {
    let (mut lora, data) = (adapter(), batches());
    let mut opt = adamw(&lora);
    let mut outs = Vec::new();
    for (s, max_norm) in [(0usize, 0.05f32), (1, 0.0)] {
        let step = OptimStep {
            batches: &data,
            dropout: Some(&SEEDS),
            lr: 1e-2 * (s + 1) as f32,
            max_grad_norm: max_norm,
        };
        outs.push(run(&mut lora, &mut opt, &step));
    }
    (outs, lora)
}

#[test]
fn one_rank_is_the_host_step_bit_for_bit() {
    let mut e = engine();
    let (want, want_lora) = two_steps(&mut |l, o, s| host_optimizer_step(&mut e, l, o, s).unwrap());
    let mut e = engine();
    let (got, got_lora) = two_steps(&mut |l, o, s| {
        data_parallel_step(&mut e, &mut SingleComm, l, o, s, &mut []).unwrap()
    });
    assert_eq!(got, want);
    assert!(
        want[0].grad_norm > 0.05,
        "clipping was exercised: {:?}",
        want[0]
    );
    assert_eq!(got_lora, want_lora);
    assert_ne!(got_lora, adapter(), "the steps changed the adapter");
}

#[test]
fn two_and_three_ranks_match_one_process() {
    let mut e = engine();
    let (want, want_lora) = two_steps(&mut |l, o, s| host_optimizer_step(&mut e, l, o, s).unwrap());
    for n in [2usize, 3] {
        let results = with_group(n, quick(), Vec::new(), |rank, mut comm, _| {
            let mut e = engine();
            let mut flags_seen = Vec::new();
            let (outs, lora) = two_steps(&mut |l, o, s| {
                // Rank 1 requests a stop in the second step: every rank must see it there.
                let mut flags = [f64::from(u8::from(rank == 1 && o.step_count() == 1))];
                let out = data_parallel_step(&mut e, &mut comm, l, o, s, &mut flags).unwrap();
                flags_seen.push(flags[0]);
                out
            });
            (outs, lora, flags_seen)
        });
        for (rank, (outs, lora, flags)) in results.iter().enumerate() {
            assert_eq!(flags, &vec![0.0, 1.0], "rank {rank}");
            // Every rank holds the same adapter, bit for bit.
            assert_eq!(lora, &results[0].1, "rank {rank} of {n} diverged");
            // Step 1 sums the same f64 losses in another order; step 2 starts from adapters
            // that differ by the f32 rounding of the gradient sums.
            for ((o, w), tol) in outs.iter().zip(&want).zip([1e-12, 1e-6]) {
                assert_eq!((o.targets, o.applied), (w.targets, w.applied));
                assert!(
                    (o.loss - w.loss).abs() <= tol * w.loss.abs(),
                    "{o:?} vs {w:?}"
                );
                let rel = ((o.grad_norm - w.grad_norm) / w.grad_norm).abs();
                assert!(rel < 1e-5, "n={n}: grad norm {o:?} vs {w:?}");
            }
            for ((k, a), (_, b)) in lora.tensors().into_iter().zip(want_lora.tensors()) {
                for (x, y) in a.data.iter().zip(&b.data) {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "n={n} {k}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_ordinal_is_local_rank_only_when_several_gpus_are_visible() {
    let mut w = World::single();
    w.world_size = 4;
    w.rank = 3;
    w.local_rank = 1;
    assert_eq!(
        w.gpu_ordinal(1),
        0,
        "--gpus launcher: one visible device per worker"
    );
    assert_eq!(w.gpu_ordinal(0), 0);
    assert_eq!(w.gpu_ordinal(2), 1, "torchrun: every device visible");
    w.local_rank = 5;
    assert_eq!(w.gpu_ordinal(2), 0, "past the last device");
}
