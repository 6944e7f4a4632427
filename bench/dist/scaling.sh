#!/usr/bin/env bash
# Data-parallel scaling matrix (issue 11, and its two-GPU part under issue 9): `lexp bench step`
# of each model (random weights, LoRA r=4 alpha 32 on q,v, AdamW, 4 x 1024 tokens per GPU) on
# each GPU count, dense and with the block-sparse MLP over SYNTHETIC 30% block lists (the GPU
# has no MLP predictor in the step yet: labelled so in every JSON), then `lexp bench scaling`
# per model and mode: speedup, efficiency and all-reduce share, JSON + PNG + table.
# Usage: [MODELS="opt-1.3b opt-2.7b"] [MODES="dense mlp30"] bench/dist/scaling.sh LEXP OUTDIR "1 2 4 8"
set -u
LEXP=$1; OUT=$2; COUNTS=${3:-"1 2"}
MODELS=${MODELS:-"opt-1.3b opt-2.7b"}; MODES=${MODES:-"dense mlp30"}
ITERS=${ITERS:-20}
mkdir -p "$OUT"
for model in $MODELS; do
  for mode in $MODES; do
    case $mode in
      dense) flags=() ;;
      mlp30) flags=(--synthetic-mlp-density 0.3) ;;
      *) echo "unknown mode $mode" >&2; exit 2 ;;
    esac
    runs=()
    for n in $COUNTS; do
      f="$OUT/$model-$mode-${n}gpu"
      gpus=(); [ "$n" -gt 1 ] && gpus=(--gpus "$n")
      "$LEXP" bench step --model "$model" --batch 4 --seq 1024 --lora-r 4 --lora-alpha 32 \
        --warmup 5 --iters "$ITERS" "${flags[@]}" "${gpus[@]}" --json "$f.json" > "$f.log" 2>&1
      echo "$model $mode ${n} GPU(s): exit $? $(grep -m1 'median' "$f.log")"
      runs+=("$f.json")
    done
    s="$OUT/scaling-$model-$mode"
    (IFS=,; "$LEXP" bench scaling --runs "${runs[*]}" --json "$s.json" --png "$s.png") > "$s.md" 2>&1
    echo "scaling $model $mode: exit $?"; cat "$s.md"
  done
done
