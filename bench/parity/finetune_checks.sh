#!/usr/bin/env bash
# Runs on the GPU machine (see bench/parity/README.md): lexp's fine-tuning acceptance checks.
#  1. `lexp finetune` with no arguments (bundled opt-tiny + E2E slice), timed; its adapter
#     loaded by PEFT and evaluated there (check_adapter.py).
#  2. opt-mini on the full E2E train set, LoRA r=8/alpha 16 on q,v, lr 5e-4, 16 examples per
#     step, 2 epochs, eval on the full E2E eval set; its adapter evaluated by PEFT too.
# Usage: bench/parity/finetune_checks.sh LEXP_BINARY FIXTURES DATA OUT
set -uo pipefail
LEXP=$1; FIX=$2; DATA=$3; OUT=$4
export LEXP_CACHE=$OUT/cache
mkdir -p "$OUT"
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u; } > "$OUT/machine.txt" 2>&1
t0=$(date +%s%N)
"$LEXP" finetune --output "$OUT/default" > "$OUT/default.log" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/default.log"
ASSETS=$(ls -d "$LEXP_CACHE"/default-*)
python3 bench/parity/check_adapter.py --base "$ASSETS/opt-tiny" --adapter "$OUT/default/adapter" \
  --data "$ASSETS/e2e/eval.jsonl" \
  --expect "$(python3 -c "import json;print(json.load(open('$OUT/default/summary.json'))['eval_loss_end'])")" \
  --out "$OUT/default-peft-check.json" > "$OUT/default-peft-check.log" 2>&1
t0=$(date +%s%N)
timeout 420 "$LEXP" finetune --model "$FIX/opt-mini" --data "$DATA/train.jsonl" --eval-data "$DATA/eval.jsonl" \
  --lora-r 8 --lora-alpha 16 --lora-targets q_proj,v_proj --lr 5e-4 --batch 16 --epochs 2 \
  --eval-every 292 --save-every 100 --output "$OUT/opt-mini" > "$OUT/opt-mini.log" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/opt-mini.log"
python3 bench/parity/check_adapter.py --base "$FIX/opt-mini" --adapter "$OUT/opt-mini/adapter" \
  --data "$DATA/eval.jsonl" \
  --expect "$(python3 -c "import json;print(json.load(open('$OUT/opt-mini/summary.json'))['eval_loss_end'])")" \
  --out "$OUT/opt-mini-peft-check.json" > "$OUT/opt-mini-peft-check.log" 2>&1
rm -rf "$LEXP_CACHE"
tail -3 "$OUT"/*.log
