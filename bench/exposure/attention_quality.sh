#!/usr/bin/env bash
# Attention exposure's quality check (issue 7, acceptance 4; DESIGN.md §7, attention): opt-mini
# LoRA (r=8, alpha 16, q,v, lr 5e-4) on 1024-token windows of corpus/valid.txt, once dense and
# once with `--exposure attention`, both on the CPU engine (the GPU engine does not train with
# attention exposure yet), run in parallel with THREADS rayon threads each.
#
# Data split: `lexp finetune --text-windows 1024 --eval-fraction 0.2` cuts the text into full
# 1024-token windows in file order; the first 80% of the windows train, the last 20% (a
# contiguous tail, never trained on) give the held-out loss. Both runs see the same windows in
# the same order (same seed).
#
# Prints (and writes to OUT/comparison.txt) both runs' final held-out losses (the attention
# run's sparse, as it trains, and dense), their relative gaps against the dense run (the
# acceptance: within 1%), the share of causal key blocks the attention run computed, the probes'
# recall and dense-probe gaps. Note: opt-mini was pretrained on 512-token windows; at 1024
# tokens restricting attention can *lower* the loss, so a negative gap is not a bug.
#
# Usage: bench/exposure/attention_quality.sh [LEXP_BINARY FIXTURES DATA OUT [extra flags]]
#   LEXP_BINARY default target/release/lexp, FIXTURES default /work/shared/fixtures (on the GPU
#   machine .gpu/fixtures), DATA default /work/shared/data (on the GPU machine .gpu/data),
#   OUT default /tmp/attention-quality; extra flags go to the attention run only (default
#   ATTN_FLAGS below), e.g. --attn-target 0.95 --attn-block 64.
# Environment: MAX_STEPS (default 60, about 5 epochs of the ~95 training windows), BATCH
# (windows per step, default 8), EPOCHS (default 10: MAX_STEPS decides), THREADS (per run, default 8), WINDOW (tokens, default 1024), TEXT (default
# DATA/corpus/valid.txt), EVAL_MAX (cap on held-out windows, default 0 = all), RUNS (default
# "dense attention"; "attention" reruns only it, OUT/dense must hold a dense run), SEQUENTIAL=1
# runs them one after the other.
#
# Cost estimate (measured on the 2 busy cores of the dev box, 3 steps): dense 744 tokens/s,
# attention 908 tokens/s (8192 tokens a step: ~11 s and ~9 s a step with 2 threads), plus ~8 s
# of predictor training per 2 dense batches. With 8 threads per run on a 16-core machine expect
# ~3 s a step, so the default 60 steps take ~3-5 minutes per run, evaluations included.
#
# Smoke run (what was run on the dev box): MAX_STEPS=3 EVAL_MAX=2 THREADS=2 SEQUENTIAL=1 \
#   bench/exposure/attention_quality.sh target/release/lexp /work/shared/fixtures \
#   /work/shared/data /tmp/attn-q-smoke --predictor-batches 2 --predictor-steps 100 --probe-every 1
set -euo pipefail
LEXP=${1:-target/release/lexp}
FIX=${2:-/work/shared/fixtures}
DATA=${3:-/work/shared/data}
OUT=${4:-/tmp/attention-quality}
shift $(( $# < 4 ? $# : 4 ))
ATTN_FLAGS=(--attn-target 0.9 --attn-window 1 --attn-sinks 1 --attn-block 128 --attn-rank 16
  --predictor-batches 8 --predictor-steps 1000 --probe-every 5)
if [ $# -gt 0 ]; then ATTN_FLAGS=("$@"); fi
MAX_STEPS=${MAX_STEPS:-60}
BATCH=${BATCH:-8}
EPOCHS=${EPOCHS:-10}
THREADS=${THREADS:-8}
WINDOW=${WINDOW:-1024}
TEXT=${TEXT:-$DATA/corpus/valid.txt}
EVAL_MAX=${EVAL_MAX:-0}
mkdir -p "$OUT"
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true; date -u; } > "$OUT/machine.txt" 2>&1
common=(finetune --device cpu --model "$FIX/opt-mini" --data "$TEXT" --text-windows "$WINDOW"
  --eval-fraction 0.2 --eval-max-examples "$EVAL_MAX" --micro-batch-tokens $((4 * WINDOW))
  --lora-r 8 --lora-alpha 16 --lora-targets q_proj,v_proj --lr 5e-4 --batch "$BATCH"
  --epochs "$EPOCHS" --max-steps "$MAX_STEPS" --save-every 0 --seed 0)
run_one() {
  local run=$1 extra=()
  rm -rf "${OUT:?}/$run"
  if [ "$run" = attention ]; then extra=(--exposure attention "${ATTN_FLAGS[@]}"); fi
  local t0; t0=$(date +%s)
  RAYON_NUM_THREADS=$THREADS "$LEXP" "${common[@]}" "${extra[@]}" --output "$OUT/$run" \
    > "$OUT/$run.log" 2>&1 || { echo "$run failed: see $OUT/$run.log" >&2; return 1; }
  echo "$run: $(( $(date +%s) - t0 )) s with $THREADS threads" | tee -a "$OUT/times.txt"
}
pids=()
for run in ${RUNS:-dense attention}; do
  if [ "${SEQUENTIAL:-0}" = 1 ]; then run_one "$run"; else run_one "$run" & pids+=($!); fi
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$OUT" "$WINDOW" <<'PY' | tee "$OUT/comparison.txt"
import json, sys
out, window = sys.argv[1], sys.argv[2]
d = json.load(open(f"{out}/dense/summary.json"))
a = json.load(open(f"{out}/attention/summary.json"))
dense, sparse, adense = d["eval_loss_end"], a["eval_loss_end"], a.get("eval_loss_end_dense")
rate = lambda s: s["tokens"] / max(s["train_seconds"], 1e-9)
print(f"opt-mini LoRA r=8 q,v on {window}-token windows: first 80% of the windows train, "
      f"held-out loss on the last 20% ({d['eval_targets']} target tokens)")
print(f"dense run:     held-out loss {dense:.4f} (start {d['eval_loss_start']:.4f}), "
      f"{d['steps']} steps, {rate(d):.0f} tokens/s")
print(f"attention run: held-out loss {sparse:.4f} sparse, {adense:.4f} dense "
      f"(start {a['eval_loss_start']:.4f} sparse), {a['steps']} steps, {rate(a):.0f} tokens/s")
gap = (sparse - dense) / dense
print(f"relative gap (attention run, sparse eval, vs dense run): {100 * gap:+.3f}% "
      f"-> {'within' if abs(gap) <= 0.01 else 'NOT within'} 1%")
print(f"relative gap (attention run evaluated dense vs dense run): "
      f"{100 * (adense - dense) / dense:+.3f}%")
x = a.get("attention") or {}
if x:
    pct = lambda v: "-" if v is None else f"{100 * v:+.3f}%"
    rec = "-" if x["recall"] is None else f"{x['recall']:.4f}"
    print(f"causal key blocks computed over training: {100 * x['density']:.1f}%; probe recall "
          f"{rec}; {x['probes']} dense probes, gap mean {pct(x['mean_gap'])}, last "
          f"{pct(x['last_gap'])}, max {pct(x['max_gap'])}")
    for i, l in enumerate(x["layers"]):
        r = "-" if l["recall"] is None else f"{l['recall']:.4f}"
        print(f"  layer {i}: density {l['density']:.3f} recall {r} final target {l['target']:.4f}")
PY
