#!/usr/bin/env bash
# Data-parallel checks of issue 9 on a machine with two GPUs (nvidia-h200-x2), one GPU call:
#   1. throughput: `lexp bench step` of OPT-1.3B (random weights, LoRA r=4 alpha 32 on q,v,
#      AdamW) at 4 x 1024 (and 4 x 512) tokens per GPU, one GPU, then --gpus 2, then one GPU
#      again; `lexp bench scaling` turns them into speedup, efficiency and all-reduce share;
#   2. loss curves: `lexp finetune` of opt-mini on E2E, the same global batch and seed, on one
#      GPU and with --gpus 2;
#   3. failure: a --gpus 2 run whose worker 1 is killed with SIGKILL after rank 0's checkpoint
#      of step 100; the launcher's exit time and message; then --resume to the end;
#   4. hang: the same, worker 1 stopped with SIGSTOP instead, LEXP_DIST_TIMEOUT_S=15: rank 0's
#      NCCL watchdog must end the run with an error.
# Usage: [PARTS="bench curve kill hang"] bench/dist/dp_checks.sh LEXP FIXTURES DATA OUTDIR
# (FIXTURES holds opt-mini, DATA holds e2e/train.jsonl and e2e/eval.jsonl; libnccl.so on
# LD_LIBRARY_PATH).
set -u
LEXP=$1; FIX=$2; DATA=$3; OUT=$4
PARTS=${PARTS:-"bench curve kill hang"}
has() { [[ " $PARTS " == *" $1 "* ]]; }
mkdir -p "$OUT"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
COMMON=(--model "$FIX/opt-mini" --data "$DATA/e2e/train.jsonl" --eval-data "$DATA/e2e/eval.jsonl"
  --eval-max-examples 512 --batch 32 --micro-batch-tokens 1024 --lora-r 8 --lora-alpha 16
  --lr 5e-4 --seed 0 --device cuda)

# The pid of worker RANK among the children of launcher pid L.
worker_pid() { # L RANK
  local p
  for p in $(pgrep -P "$1"); do
    tr '\0' '\n' < /proc/$p/environ 2>/dev/null | grep -qx "RANK=$2" && echo "$p"
  done
}
# Starts a --gpus 2 run in $OUT/NAME, waits for rank 0's checkpoint of step 100, sends SIGNAL
# to worker 1 and reports how long the launcher took to exit.
fail_worker() { # NAME SIGNAL
  local name=$1 sig=$2
  "$LEXP" finetune "${COMMON[@]}" --max-steps 1500 --eval-every 0 --save-every 50 \
    --output "$OUT/$name" --gpus 2 > "$OUT/$name.log" 2>&1 &
  local L=$!
  for _ in $(seq 1 3000); do
    [ -e "$OUT/$name/checkpoints/step-00000100/trainer_state.json" ] && break
    kill -0 $L 2>/dev/null || break
    sleep 0.1
  done
  local W1; W1=$(worker_pid $L 1)
  if [ -z "$W1" ]; then
    echo "$name: worker 1 not found (launcher alive: $(kill -0 $L 2>/dev/null && echo yes || echo no))" >> "$OUT/summary.txt"
    return 1
  fi
  local T0 T1 RC; T0=$(date +%s.%N); kill -"$sig" "$W1"; wait $L; RC=$?; T1=$(date +%s.%N)
  local STEPS; STEPS=$(grep -c '"kind":"train"' "$OUT/$name/metrics.jsonl" 2>/dev/null || echo "?")
  echo "$name: worker 1 (pid $W1) sent SIG$sig; launcher exited with $RC after $(python3 -c "print(f'{$T1-$T0:.2f}')") s; train records so far: $STEPS; its message: $(grep -m1 'lexp finetune:' "$OUT/$name.log")" >> "$OUT/summary.txt"
  kill -KILL "$W1" 2>/dev/null
  return 0
}

if has bench; then
# 1. Throughput.
bench() { # NAME [extra flags]
  local name=$1; shift
  "$LEXP" bench step --model opt-1.3b --batch 4 --seq 512,1024 --lora-r 4 --lora-alpha 32 \
    --warmup 5 --iters 30 --json "$OUT/bench-$name.json" "$@" > "$OUT/bench-$name.log" 2>&1
  echo "bench $name: exit $?" >> "$OUT/summary.txt"
}
bench 1gpu-a
bench 2gpu --gpus 2
bench 1gpu-b
for one in a b; do
  "$LEXP" bench scaling --runs "$OUT/bench-1gpu-$one.json,$OUT/bench-2gpu.json" \
    --json "$OUT/scaling-$one.json" --png "$OUT/scaling-$one.png" > "$OUT/scaling-$one.md" 2>&1
  echo "scaling against one-GPU run $one: exit $?" >> "$OUT/summary.txt"
done
fi

if has curve; then
# 2. Loss curves: one GPU vs two, same global batch (32 examples in micro-batches of at most
# 1024 tokens; each rank computes every other micro-batch) and seed.
"$LEXP" finetune "${COMMON[@]}" --max-steps 150 --eval-every 25 --save-every 0 \
  --output "$OUT/curve-1gpu" > "$OUT/curve-1gpu.log" 2>&1
echo "curve 1gpu: exit $?" >> "$OUT/summary.txt"
"$LEXP" finetune "${COMMON[@]}" --max-steps 150 --eval-every 25 --save-every 0 --gpus 2 \
  --output "$OUT/curve-2gpu" > "$OUT/curve-2gpu.log" 2>&1
echo "curve 2gpu: exit $?" >> "$OUT/summary.txt"
python3 - "$OUT" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
out = sys.argv[1]
def recs(run, kind):
    rows = [json.loads(l) for l in open(f"{out}/{run}/metrics.jsonl")]
    return {r["step"]: r for r in rows if r["kind"] == kind}
for kind in ("train", "eval"):
    a, b = recs("curve-1gpu", kind), recs("curve-2gpu", kind)
    steps = sorted(set(a) & set(b))
    rel = [abs(a[s]["loss"] - b[s]["loss"]) / abs(a[s]["loss"]) for s in steps]
    same_targets = all(a[s]["targets"] == b[s]["targets"] for s in steps)
    print(f"curve {kind}: {len(a)} vs {len(b)} records, {len(steps)} common steps, "
          f"targets equal {same_targets}, max relative loss difference {max(rel):.3e}, "
          f"mean {sum(rel)/len(rel):.3e}; first {a[steps[0]]['loss']:.4f}/{b[steps[0]]['loss']:.4f}, "
          f"last {a[steps[-1]]['loss']:.4f}/{b[steps[-1]]['loss']:.4f}")
PY

fi

if has kill; then
# 3. Kill worker 1 after rank 0's checkpoint of step 100, then resume.
if fail_worker kill KILL; then
  "$LEXP" finetune "${COMMON[@]}" --max-steps 1500 --eval-every 0 --save-every 50 \
    --output "$OUT/kill" --gpus 2 --resume > "$OUT/resume.log" 2>&1
  echo "resume: exit $?; $(grep -m1 -i 'resumed from' "$OUT/resume.log")" >> "$OUT/summary.txt"
  python3 - "$OUT/kill/metrics.jsonl" >> "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r["step"] for r in rows if r["kind"] == "train"]
print(f"resume: train steps recorded {len(steps)}, last {steps[-1]}, "
      f"continuous {sorted(set(steps)) == list(range(1, steps[-1] + 1))}")
PY
fi
fi

if has hang; then
# 4. A hung worker (SIGSTOP): rank 0's NCCL watchdog ends the run after the collective timeout.
export LEXP_DIST_TIMEOUT_S=15
fail_worker hang STOP
unset LEXP_DIST_TIMEOUT_S
grep -m1 "has not completed" "$OUT/hang.log" >> "$OUT/summary.txt"
fi

find "$OUT" -name checkpoints -prune -exec rm -rf {} + 2>/dev/null
find "$OUT" -name adapter -prune -exec rm -rf {} + 2>/dev/null
cat "$OUT/summary.txt"
