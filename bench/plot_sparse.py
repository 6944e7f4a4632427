#!/usr/bin/env python3
"""Time against density of the block-sparse GEMM, one panel per problem shape, with dense cuBLAS
on the same shape as the bar to beat.

Input: a JSON file holding a list of records under the key "sparse" (or the list alone), each

    {"gpu": "NVIDIA H200", "date": "2026-11-29", "shape": {"m": 16384, "k": 2048, "n": 8192},
     "block": 128, "mode": "sparse_out", "density": 0.25, "ms": 1.23,
     "cublas_dense_ms": 2.0, "eval": "..."}

Each panel draws one line per (mode, block) of our sparse GEMM, time (ms) over density (0..1),
a dashed horizontal line at dense cuBLAS's time for that shape (the median of the records'
`cublas_dense_ms`), and thin dotted reference lines at 0.40x and 0.70x of it. Records that lack
a key the plot needs, or hold a value of the wrong kind, are skipped with a warning on stderr;
a record without `cublas_dense_ms` still gets its point.

usage: plot_sparse.py BENCH.json OUT.png
"""
import json
import math
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Fractions of dense cuBLAS's time drawn as reference lines.
REFERENCE_FRACTIONS = (0.40, 0.70)


def warn(msg: str) -> None:
    print(f"plot_sparse.py: warning: {msg}", file=sys.stderr)


def number(value):
    """The value as a finite float, or None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def shape_key(shape):
    """(m, k, n) of a record's shape, or None if it is not one."""
    if not isinstance(shape, dict):
        return None
    dims = [shape.get(d) for d in ("m", "k", "n")]
    if any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims):
        return None
    return tuple(dims)


def load_records(path: str):
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        if "sparse" not in data:
            raise SystemExit(f"plot_sparse.py: {path} has no key 'sparse'")
        records = data["sparse"]
    else:
        records = data
    if not isinstance(records, list):
        raise SystemExit(f"plot_sparse.py: 'sparse' in {path} is not a list")
    return records


def clean(records):
    """The usable records as dicts with checked fields; warns once per skipped record."""
    rows = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            warn(f"record {i} is not an object; skipped")
            continue
        missing = [k for k in ("shape", "mode", "block", "density", "ms") if k not in r]
        if missing:
            warn(f"record {i} lacks {', '.join(missing)}; skipped")
            continue
        shape = shape_key(r["shape"])
        density, ms = number(r["density"]), number(r["ms"])
        problems = []
        if shape is None:
            problems.append(f"shape {r['shape']!r} is not {{m, k, n}} of positive integers")
        if density is None or not 0.0 <= density <= 1.0:
            problems.append(f"density {r['density']!r} is not a number in [0, 1]")
        if ms is None or ms <= 0:
            problems.append(f"ms {r['ms']!r} is not a positive number")
        if problems:
            warn(f"record {i}: {'; '.join(problems)}; skipped")
            continue
        dense = None
        if "cublas_dense_ms" not in r:
            warn(f"record {i} lacks cublas_dense_ms; plotted without it")
        else:
            dense = number(r["cublas_dense_ms"])
            if dense is None or dense <= 0:
                warn(f"record {i}: cublas_dense_ms {r['cublas_dense_ms']!r} is not a positive "
                     "number; ignored")
                dense = None
        rows.append({
            "shape": shape,
            "mode": str(r["mode"]),
            "block": r["block"],
            "density": density,
            "ms": ms,
            "dense_ms": dense,
            "gpu": r.get("gpu"),
            "date": r.get("date"),
            "eval": r.get("eval"),
        })
    return rows


def title_of(rows):
    """'NVIDIA H200, 2026-11-29' from the records' gpu and date (all distinct values)."""
    parts = []
    for key in ("gpu", "date"):
        values = list(dict.fromkeys(str(r[key]) for r in rows if r[key] is not None))
        if values:
            parts.append(" / ".join(values))
    head = "Block-sparse GEMM vs dense cuBLAS"
    return f"{head} ({', '.join(parts)})" if parts else head


def plot(rows, out: str) -> None:
    shapes = sorted({r["shape"] for r in rows})
    # Blocks sort by number where they are numbers (64 before 128).
    series_keys = sorted(
        {(r["mode"], str(r["block"])) for r in rows},
        key=lambda key: (key[0], 0, int(key[1])) if key[1].isdigit() else (key[0], 1, key[1]),
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {key: colors[i % len(colors)] for i, key in enumerate(series_keys)}

    fig, axes = plt.subplots(
        1, len(shapes), figsize=(6.5 * len(shapes), 5), squeeze=False, sharey=False
    )
    for ax, shape in zip(axes[0], shapes):
        here = [r for r in rows if r["shape"] == shape]
        lines = defaultdict(list)
        for r in here:
            lines[(r["mode"], str(r["block"]))].append((r["density"], r["ms"]))
        for key in series_keys:
            if key not in lines:
                continue
            pts = sorted(lines[key])
            mode, block = key
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4,
                    linewidth=1.5, color=color_of[key], label=f"{mode}, block {block}")
        dense = [r["dense_ms"] for r in here if r["dense_ms"] is not None]
        if dense:
            dense_ms = statistics.median(dense)
            ax.axhline(dense_ms, color="black", linestyle="--", linewidth=1.2,
                       label=f"dense cuBLAS ({dense_ms:.3g} ms)")
            for frac in REFERENCE_FRACTIONS:
                y = frac * dense_ms
                ax.axhline(y, color="gray", linestyle=":", linewidth=0.8)
                ax.annotate(f"{frac:.2f}x cuBLAS ({y:.3g} ms)", xy=(1.0, y), xycoords=("axes fraction", "data"),
                            xytext=(-4, 2), textcoords="offset points", ha="right", va="bottom",
                            fontsize=8, color="gray")
        else:
            warn(f"shape m={shape[0]} k={shape[1]} n={shape[2]} has no cublas_dense_ms; no "
                 "cuBLAS line")
        m, k, n = shape
        ax.set_title(f"M={m}, K={k}, N={n}", fontsize=10)
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("density (fraction of blocks computed)")
        ax.set_ylabel("time (ms, median)")
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title_of(rows))
    evals = list(dict.fromkeys(str(r["eval"]) for r in rows if r["eval"] is not None))
    if len(evals) == 1:
        fig.text(0.5, 0.005, evals[0], ha="center", va="bottom", fontsize=7, color="dimgray",
                 wrap=True)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    src, out = sys.argv[1], sys.argv[2]
    rows = clean(load_records(src))
    if not rows:
        raise SystemExit(f"plot_sparse.py: no plottable record in {src}")
    plot(rows, out)


if __name__ == "__main__":
    main()
