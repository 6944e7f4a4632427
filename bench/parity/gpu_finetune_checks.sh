#!/usr/bin/env bash
# GPU-machine checks of the GPU training engine (run from the repository root there):
#  1. every DSL kernel against its CPU reference (`lexp check`);
#  2. the GPU engine's tests against the CPU engine (runtime/tests/gpu_engine.rs);
#  3. device choice: --device cuda trains with dropout too; auto picks the GPU;
#  4. `lexp finetune` with no arguments on the GPU, timed, and its adapter evaluated by PEFT.
# Usage: bench/parity/gpu_finetune_checks.sh OUT   (with .gpu/lexp.gz and .gpu/gpu_engine.gz)
set -uo pipefail
OUT=$1; mkdir -p "$OUT"; BIN=/tmp/lexp-bin; mkdir -p $BIN
gunzip -c .gpu/lexp.gz > $BIN/lexp && gunzip -c .gpu/gpu_engine.gz > $BIN/gpu_engine && chmod +x $BIN/*
CUBLAS_DIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/libcu[rb][al][na][ds]*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH=${CUBLAS_DIRS}:${LD_LIBRARY_PATH:-}
export LEXP_CACHE=/tmp/lexp-cache
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; } > "$OUT/machine.txt"
timeout 200 $BIN/lexp check --json "$OUT/check.json" > "$OUT/check.txt" 2>&1; echo "exit $?" >> "$OUT/check.txt"
LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_engine --nocapture --test-threads=1 > "$OUT/gpu_engine_tests.txt" 2>&1
echo "exit $?" >> "$OUT/gpu_engine_tests.txt"
D="$OUT/device_choice.txt"
$BIN/lexp finetune --device cuda --lora-dropout 0.1 --model-dropout 0.1 --max-steps 2 --output /tmp/dc1 >> "$D" 2>&1; echo "exit $? (expect 0, on the GPU with dropout)" >> "$D"
$BIN/lexp finetune --max-steps 2 --output /tmp/dc2 >> "$D" 2>&1; echo "exit $? (expect 0)" >> "$D"
$BIN/lexp finetune --device cpu --max-steps 2 --output /tmp/dc3 >> "$D" 2>&1; echo "exit $? (expect 0, on the CPU)" >> "$D"
t0=$(date +%s%N)
$BIN/lexp finetune --output "$OUT/default" > "$OUT/default.log" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/default.log"
A=$(ls -d $LEXP_CACHE/default-*)
python3 bench/parity/check_adapter.py --base "$A/opt-tiny" --adapter "$OUT/default/adapter" --data "$A/e2e/eval.jsonl" \
  --expect "$(python3 -c "import json;print(json.load(open('$OUT/default/summary.json'))['eval_loss_end'])")" \
  --out "$OUT/default-peft-check.json" > "$OUT/default-peft-check.log" 2>&1
cp "$OUT/default/metrics.jsonl" "$OUT/default-metrics.jsonl"; cp "$OUT/default/loss_curve.png" "$OUT/default-loss-curve.png"
rm -rf "$OUT/default"
tail -n 3 "$OUT"/*.txt "$OUT"/*.log
