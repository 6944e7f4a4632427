"""cuBLAS (through torch.matmul) timings for the dense GEMM shapes of `lexp bench matmul`.

Usage: python3 bench/torch_gemm.py [iters]. Prints JSON lines: layout, m, n, k, median ms.
Warm-up 10, then `iters` launches each between its own pair of CUDA events.
"""
import json
import sys

import torch


def median_ms(fn, iters):
    for _ in range(10):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in ev)
    return t[len(t) // 2]


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    torch.manual_seed(0)
    for layout in ["nn", "nt", "tn"]:
        for m, n, k in [(4096, 4096, 4096), (16384, 8192, 2048)]:
            a = torch.randn(k, m, device="cuda", dtype=torch.bfloat16).t() if layout == "tn" else torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t() if layout == "nt" else torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
            c = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ms = median_ms(lambda: torch.matmul(a, b, out=c), iters)
            print(json.dumps({"layout": layout, "m": m, "n": n, "k": k, "ms": ms, "tflops": 2 * m * n * k / ms / 1e9,
                              "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
