"""Joins the JSONs of bench/paper_table.sh into the paper's end-to-end table (its Figure 7
setting): per model, PEFT method and sequence length, the step time of HF PEFT with eager
attention (the paper's baseline) and with SDPA (both padded: 4 examples per step, each padded to
512/1024 tokens), of lexp dense and of lexp with exposure (whole examples packed into the same
4 x 512 / 4 x 1024 token budget; exposure = the MLP on block-sparse kernels over a SYNTHETIC
25% predictor), the speedups, device memory, and what each step trains on.

Usage: python3 bench/paper_table.py OUT_DIR
Writes OUT_DIR/paper-table.json, paper-table.md and paper-table.png.
"""

import glob
import json
import os
import sys

# The paper's own end-to-end speedups over its eager PEFT baseline (LoRA, OPT-1.3B, A100), and
# the factor the issue asks us to beat them by.
PAPER = {("opt-1.3b", "lora", 512): 1.30, ("opt-1.3b", "lora", 1024): 2.52}
BEAT_PAPER_BY = 1.5
METHOD_NAMES = {"lora": "LoRA", "houlsby": "Adapter", "bitfit": "BitFit"}


def load(path):
    with open(path) as f:
        return json.load(f)


def rows_of(out):
    torch_runs, lexp_runs, meta = {}, {}, {}
    for path in glob.glob(os.path.join(out, "torch-*.json")):
        d = load(path)
        model, method = d["model"]["name"], d.get("peft_method", "lora")
        meta.setdefault("torch", {k: d.get(k) for k in ("gpu", "driver", "torch", "cuda", "transformers", "peft", "date")})
        for r in d["runs"]:
            torch_runs[(model, method, r["seq_len"], r["attn"])] = r
        for r in d.get("failed", []):
            seq = int(r["batch"].split("x")[1])
            torch_runs[(model, method, seq, r["attn"])] = {"error": r["error"]}
    for path in glob.glob(os.path.join(out, "lexp-*.json")):
        mode = os.path.basename(path).split("-")[1]
        d = load(path)
        model = d["model"]["name"]
        method = path.rsplit("-", 1)[1][: -len(".json")]
        meta.setdefault("lexp", {k: d.get(k) for k in ("device", "lexp_version", "lexp_commit", "date")})
        if d.get("exposure"):
            meta["exposure"] = d["exposure"]
        for w in d["workloads"]:
            lexp_runs[(model, method, w["seq"], mode)] = w
    keys = sorted({k[:3] for k in torch_runs} | {k[:3] for k in lexp_runs},
                  key=lambda k: (k[0], list(METHOD_NAMES).index(k[1]) if k[1] in METHOD_NAMES else 9, k[2]))
    rows = []
    for model, method, seq in keys:
        eager = torch_runs.get((model, method, seq, "eager"), {})
        sdpa = torch_runs.get((model, method, seq, "sdpa"), {})
        dense = lexp_runs.get((model, method, seq, "dense"), {})
        expo = lexp_runs.get((model, method, seq, "exposure"), {})
        ms = lambda r: r.get("median_step_ms") if "median_step_ms" in r else (r.get("step") or {}).get("median_ms")
        e, s, d, x = ms(eager), ms(sdpa), ms(dense), ms(expo)
        ratio = lambda a, b: a / b if a and b else None
        row = {
            "model": model, "method": method, "seq": seq,
            "hf_eager_ms": e, "hf_sdpa_ms": s, "lexp_dense_ms": d, "lexp_exposure_ms": x,
            "dense_vs_eager": ratio(e, d), "dense_vs_sdpa": ratio(s, d),
            "exposure_vs_eager": ratio(e, x), "exposure_vs_sdpa": ratio(s, x),
            "exposure_vs_dense": ratio(d, x),
            "paper_vs_eager": PAPER.get((model, method, seq)),
            "hf_eager_mem_mib": eager.get("device_used_mib"), "hf_sdpa_mem_mib": sdpa.get("device_used_mib"),
            "hf_sdpa_peak_alloc_mib": sdpa.get("peak_allocated_mib"),
            "lexp_dense_mem_mib": dense.get("device_used_mib"), "lexp_exposure_mem_mib": expo.get("device_used_mib"),
            "hf_examples_per_step": (sdpa.get("data") or {}).get("examples"),
            "hf_real_tokens": (sdpa.get("data") or {}).get("real_tokens"),
            "hf_tokens": sdpa.get("tokens"),
            "lexp_examples_per_step": dense.get("batch"), "lexp_tokens": dense.get("tokens"),
            "loss_hf_sdpa_last": sdpa.get("loss_last"),
            "loss_lexp_dense": [dense.get("loss_first"), dense.get("loss_last")],
            "loss_lexp_exposure": [expo.get("loss_first"), expo.get("loss_last")],
            "errors": {k: r["error"] for k, r in (("eager", eager), ("sdpa", sdpa)) if "error" in r},
        }
        if row["paper_vs_eager"] and row["exposure_vs_eager"]:
            row["target_vs_eager"] = BEAT_PAPER_BY * row["paper_vs_eager"]
            row["beats_paper_by_1_5x"] = row["exposure_vs_eager"] >= row["target_vs_eager"]
        row["exposure_beats_sdpa"] = bool(row["exposure_vs_sdpa"] and row["exposure_vs_sdpa"] > 1.0)
        rows.append(row)
    return rows, meta


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def markdown(rows):
    lines = [
        "| model | method | tokens | HF eager (padded) | HF SDPA (padded) | lexp dense (packed) | lexp exposure (packed, synthetic 25% MLP) | exposure vs eager | vs SDPA | vs lexp dense | paper vs eager | memory: SDPA / lexp exposure (MiB) | examples per step: HF / lexp |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {METHOD_NAMES.get(r['method'], r['method'])} | 4 x {r['seq']} | "
            f"{fmt(r['hf_eager_ms'], '.2f')} ms | {fmt(r['hf_sdpa_ms'], '.2f')} ms | {fmt(r['lexp_dense_ms'], '.2f')} ms | "
            f"{fmt(r['lexp_exposure_ms'], '.2f')} ms | **{fmt(r['exposure_vs_eager'], '.2f')}x** | "
            f"**{fmt(r['exposure_vs_sdpa'], '.2f')}x** | {fmt(r['exposure_vs_dense'], '.2f')}x | "
            f"{fmt(r['paper_vs_eager'], '.2f')}{'x' if r['paper_vs_eager'] else ''} | "
            f"{fmt(r['hf_sdpa_mem_mib'], '.0f')} / {fmt(r['lexp_exposure_mem_mib'], '.0f')} | "
            f"{fmt(r['hf_examples_per_step'], 'd')} / {fmt(r['lexp_examples_per_step'], 'd')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("hf_eager_ms", "HF PEFT eager (padded)", "#b0b0b0"), ("hf_sdpa_ms", "HF PEFT SDPA (padded)", "#6b8fb5"),
            ("lexp_dense_ms", "lexp dense (packed)", "#e0a040"),
            ("lexp_exposure_ms", "lexp exposure (packed, SYNTHETIC 25% MLP)", "#c0392b")]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(rows) + 2), 5))
    w = 0.2
    for i, (key, label, color) in enumerate(cols):
        xs = [j + (i - 1.5) * w for j in range(len(rows))]
        ys = [r[key] or 0 for r in rows]
        ax.bar(xs, ys, w, label=label, color=color)
    for j, r in enumerate(rows):
        if r["exposure_vs_eager"]:
            top = max(v for v in (r[c[0]] for c in cols) if v)
            ax.text(j, top * 1.02, f"{r['exposure_vs_eager']:.2f}x", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['model'][4:]}\n{METHOD_NAMES.get(r['method'], r['method'])}\n4x{r['seq']}" for r in rows], fontsize=8)
    ax.set_ylabel("training step (ms, median)")
    ax.set_title("Paper table (Figure 7 setting) on one H200: e2e-paper data; label = lexp exposure vs HF eager")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    out = sys.argv[1]
    rows, meta = rows_of(out)
    table = {
        "what": "The Long Exposure paper's end-to-end table (Figure 7 setting): one training step (forward, "
                "backward, clipping, AdamW) on random-weight OPT, the paper's tokenized E2E data; HF columns "
                "padded (4 examples, each padded to the length), lexp columns packed (whole examples in the "
                "same 4 x length token budget); loss on the completion tokens; lexp exposure = MLP on "
                "block-sparse kernels over a SYNTHETIC predictor keeping 25% of the blocks",
        "paper_ratios_over_eager": {f"{k[0]} {k[1]} {k[2]}": v for k, v in PAPER.items()},
        "meta": meta,
        "rows": rows,
    }
    with open(os.path.join(out, "paper-table.json"), "w") as f:
        json.dump(table, f, indent=2)
    md = markdown(rows)
    with open(os.path.join(out, "paper-table.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        plot(rows, os.path.join(out, "paper-table.png"))
    except ImportError as e:
        print(f"no plot: {e}")


if __name__ == "__main__":
    main()
