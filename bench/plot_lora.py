#!/usr/bin/env python3
"""Speedup of the fused LoRA forms over PEFT's cuBLAS sequence (rank 16, a 2048 x 2048 layer),
per token count, one point per process, from `lexp bench matmul --only lora --json` files.

Each JSON holds "lora" (the one-kernel DSL forms: rows {"pass": "forward"|"backward", "m",
"speedup"}) and "lora_fold" (the fold: rows {"pass": "forward"|"fwd-1k"|"backward"|..., "m",
"speedup"}). The plot has a forward and a backward panel, one marker per form and process, and
the 1.3x target as a dashed line. Files or rows that lack a key are skipped with a warning.

usage: plot_lora.py OUT.png BENCH.json [BENCH.json ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TARGET = 1.3
# (panel, JSON key, pass, label)
FORMS = [
    ("forward", "lora", "forward", "one kernel (lora_fwd)"),
    ("forward", "lora_fold", "forward", "fold: lora_down + cuBLASLt"),
    ("forward", "lora_fold", "fwd-1k", "fold in one lora_fwd"),
    ("backward", "lora", "backward", "one kernel (lora_bwd_dx + lora_grad)"),
    ("backward", "lora_fold", "backward", "fold (engine order)"),
]


def points(files):
    """{(panel, label): [(tokens, speedup), ...]} over every file."""
    out = {}
    for path in files:
        try:
            with open(path) as f:
                j = json.load(f)
        except (OSError, ValueError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        for panel, key, pas, label in FORMS:
            for row in j.get(key) or []:
                if row.get("pass") != pas:
                    continue
                m, s = row.get("m"), row.get("speedup")
                if not isinstance(m, int) or not isinstance(s, (int, float)):
                    print(f"{path}: skipping a {key} row without m/speedup", file=sys.stderr)
                    continue
                out.setdefault((panel, label), []).append((m, s))
    return out


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    pts = points(argv[2:])
    if not pts:
        print("no rows to plot", file=sys.stderr)
        return 1
    tokens = sorted({m for v in pts.values() for m, _ in v})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    markers = ["o", "s", "^", "D", "v"]
    for ax, panel in zip(axes, ["forward", "backward"]):
        for i, (p, key, pas, label) in enumerate(FORMS):
            if p != panel or (p, label) not in pts:
                continue
            xs = [tokens.index(m) + (i - 2) * 0.08 for m, _ in pts[(p, label)]]
            ys = [s for _, s in pts[(p, label)]]
            ax.scatter(xs, ys, marker=markers[i], label=label, alpha=0.8)
        ax.axhline(TARGET, ls="--", color="k", lw=1, label=f"target {TARGET}x")
        ax.set_xticks(range(len(tokens)), [str(t) for t in tokens])
        ax.set_xlabel("tokens")
        ax.set_title(f"fused LoRA {panel}, rank 16, d 2048")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_ylabel("speedup over PEFT's cuBLAS sequence (x)")
    fig.tight_layout()
    fig.savefig(argv[1], dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
