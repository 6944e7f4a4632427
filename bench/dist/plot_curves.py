#!/usr/bin/env python3
"""Overlays the train and eval loss curves of `lexp finetune` runs (their metrics.jsonl) in one
PNG, with the relative difference of each run's train loss to the first run's underneath: the
one-GPU vs two-GPU check of bench/dist/dp_checks.sh.

Usage: bench/dist/plot_curves.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def records(run, kind):
    with open(f"{run}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == kind}


def main():
    out, runs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    if not runs:
        sys.exit(__doc__)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    ref = records(runs[0][1], "train")
    for i, (label, run) in enumerate(runs):
        train, ev = records(run, "train"), records(run, "eval")
        style = "-" if i == 0 else "--"
        top.plot(list(train), list(train.values()), style, lw=1.2, label=f"{label}: train")
        top.plot(list(ev), list(ev.values()), "o" + style, ms=4, label=f"{label}: eval")
        if i > 0:
            steps = [s for s in train if s in ref]
            rel = [(train[s] - ref[s]) / ref[s] for s in steps]
            bottom.plot(steps, rel, lw=1, label=f"{label} vs {runs[0][0]}")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    bottom.set_ylabel("relative difference")
    bottom.set_xlabel("optimizer step")
    bottom.axhline(0, color="black", lw=0.5)
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.suptitle("opt-mini LoRA on E2E, same global batch and seed")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
