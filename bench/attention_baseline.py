#!/usr/bin/env python3
"""PyTorch SDPA causal attention alone, forward and forward + backward, on the shapes of
`lexp bench attention` (one sequence of L tokens, width / hd heads, bf16), for the
attention-exposure issue's dense-speed comparison. Runs on the GPU machine.

Per (L, hd): q, k, v of shape [1, heads, L, hd] (random, requires_grad), dO random;
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` with the backend PyTorch picks
("default"), and each of the flash and cuDNN backends where they run; CUDA-event median of
--iters runs after --warmup. The "default" times are the baseline `lexp bench attention
--baseline` reads (`runs[].fwd_ms`, `runs[].fwd_bwd_ms`); the per-backend times are recorded
next to them.

Usage: python3 bench/attention_baseline.py --seq 4096,16384 --head-dim 64,128 --out sdpa.json
"""
import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def measure(q, k, v, d_o, warmup, iters):
    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        o.backward(d_o)

    return timed(fwd, warmup, iters), timed(fwd_bwd, warmup, iters)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", default="4096,16384")
    p.add_argument("--head-dim", default="64,128")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    runs = []
    for hd in [int(x) for x in a.head_dim.split(",")]:
        heads = a.width // hd
        for seq in [int(x) for x in a.seq.split(",")]:
            g = torch.Generator(device="cuda").manual_seed(seq * 1000 + hd)
            make = lambda: torch.randn(1, heads, seq, hd, device="cuda", dtype=torch.bfloat16,
                                       generator=g)
            q, k, v = (make().requires_grad_() for _ in range(3))
            d_o = make()
            f, fb = measure(q, k, v, d_o, a.warmup, a.iters)
            row = {"seq": seq, "head_dim": hd, "heads": heads, "fwd_ms": f, "fwd_bwd_ms": fb,
                   "backends": {}}
            for name, b in backends.items():
                try:
                    with sdpa_kernel([b]):
                        bf, bfb = measure(q, k, v, d_o, a.warmup, a.iters)
                    row["backends"][name] = {"fwd_ms": bf, "fwd_bwd_ms": bfb}
                except RuntimeError as e:
                    row["backends"][name] = {"error": str(e).split("\n")[0][:200]}
            print(json.dumps(row), flush=True)
            runs.append(row)
            del q, k, v, d_o
            torch.cuda.empty_cache()
    out = {
        "what": "PyTorch SDPA causal attention, one sequence, bf16, forward (no grad) and forward + backward; CUDA-event medians",
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "width": a.width, "warmup": a.warmup, "iters": a.iters,
        "runs": runs,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
