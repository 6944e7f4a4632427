#!/usr/bin/env bash
# MLP exposure's quality check (DESIGN.md §7, MLP): opt-mini LoRA on E2E with the settings of
# bench/parity/finetune_checks.sh (r=8, alpha 16, q,v, lr 5e-4, 16 examples per step, 2 epochs,
# eval on the full E2E eval set), once dense and once with `--exposure mlp`, both on the CPU
# engine (the GPU engine runs the sparse MLP kernels on synthetic lists only; it has no
# predictor yet). Prints both runs' final eval losses (the mlp run's
# sparse and dense), their relative gaps and the MLP work the sparse run skipped.
#
# Usage: bench/exposure/quality.sh LEXP_BINARY FIXTURES DATA OUT [extra --exposure mlp flags]
#   e.g. bench/exposure/quality.sh target/release/lexp ../shared/fixtures ../shared/data/e2e \
#        /tmp/quality --mlp-block 32 --mlp-group 16
# MAX_STEPS=N (environment) shortens both runs to N optimizer steps; EVAL_MAX=N caps the eval
# examples (default: all); RUNS=mlp reruns only the mlp run (OUT/dense must hold a dense run).
set -euo pipefail
LEXP=$1; FIX=$2; DATA=$3; OUT=$4; shift 4
MAX_STEPS=${MAX_STEPS:-0}
EVAL_MAX=${EVAL_MAX:-0}
mkdir -p "$OUT"
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)" || true; date -u; } > "$OUT/machine.txt" 2>&1
common=(finetune --device cpu --model "$FIX/opt-mini" --data "$DATA/train.jsonl"
  --eval-data "$DATA/eval.jsonl" --eval-max-examples "$EVAL_MAX"
  --lora-r 8 --lora-alpha 16 --lora-targets q_proj,v_proj --lr 5e-4 --batch 16 --epochs 2
  --max-steps "$MAX_STEPS" --save-every 0)
for run in ${RUNS:-dense mlp}; do
  rm -rf "${OUT:?}/$run"
  extra=()
  if [ "$run" = mlp ]; then extra=(--exposure mlp "$@"); fi
  t0=$(date +%s)
  "$LEXP" "${common[@]}" "${extra[@]}" --output "$OUT/$run" > "$OUT/$run.log" 2>&1
  echo "$run: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
d = json.load(open(f"{out}/dense/summary.json"))
m = json.load(open(f"{out}/mlp/summary.json"))
dense, sparse, mdense = d["eval_loss_end"], m["eval_loss_end"], m.get("eval_loss_end_dense")
print(f"dense run:  eval loss {dense:.4f} (start {d['eval_loss_start']:.4f}), {d['steps']} steps, "
      f"{d['tokens'] / max(d['train_seconds'], 1e-9):.0f} tokens/s")
print(f"mlp run:    eval loss {sparse:.4f} sparse, {mdense:.4f} dense, {m['steps']} steps, "
      f"{m['tokens'] / max(m['train_seconds'], 1e-9):.0f} tokens/s")
print(f"relative gap (mlp sparse eval vs dense run): {100 * (sparse - dense) / dense:+.3f}%")
print(f"relative gap (mlp run evaluated dense vs dense run): {100 * (mdense - dense) / dense:+.3f}%")
x = m.get("exposure") or {}
if x:
    print(f"MLP work skipped over training: {100 * x['mlp_work_skipped']:.1f}% "
          f"({x['probes']} probes, mean probe gap {100 * (x['mean_gap'] or 0):+.3f}%, "
          f"max {100 * (x['max_gap'] or 0):+.3f}%)")
    for i, l in enumerate(x["layers"]):
        print(f"  layer {i}: density {l['density']:.3f} recall {l['recall']:.4f} final target {l['target']:.4f}")
PY
