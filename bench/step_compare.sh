#!/bin/bash
# The dense LoRA step benchmark in one call on the GPU machine: PyTorch + transformers + PEFT
# (SDPA and eager attention, bench/torch_baseline.py), then `lexp bench step` on the same
# workloads with that JSON as its baseline.
#
# Usage, from the repository root on the GPU machine, with the release `lexp` binary built on
# the development machine and compressed to .gpu/lexp.gz or .gpu/lexp.xz:
#   bench/step_compare.sh OUT_DIR [MODEL] [SEQS]
#     MODEL: opt-125m | opt-1.3b (default) | opt-2.7b   (opt-350m: the GPU engine refuses it)
#     SEQS:  tokens per sequence, comma-separated (default 512,1024)
#   Environment: BATCH (default 4), ITERS (default 25), WARMUP (default 5),
#                LEXP_COMMIT (recorded in lexp.json when the binary was built without it),
#                DEVICE (default cuda; cpu only to try the script without a GPU),
#                PEFT (lora, bitfit or houlsby: the method on both sides, default lora),
#                LORA_ALPHA (LoRA alpha on both sides, default 32: the dense-step issue's
#                r=4 alpha 32; runs before 2026-12-01 used both tools' default, 8 — the scale
#                s = alpha / r is one multiply and changes no time),
#                ATTNS (the baseline's attention implementations, default sdpa,eager; eager
#                materialises the scores and runs out of memory at 16k tokens),
#                MAX_POSITIONS (learned positions of the random-weight model on both sides, for
#                SEQS past the published 2048),
#                ALSO_ATTENTION (e.g. materialised: a second lexp run with --attention that,
#                written to lexp-ATTN.json / compare-ATTN.json, an A/B in the same call),
#                ALSO_LEXP (A/B runs with other lexp flags: "LABEL=FLAGS;LABEL=FLAGS", e.g.
#                "hostopt=--host-optimizer", written to lexp-LABEL.json / compare-LABEL.json;
#                leading VAR=value words set that run's environment, e.g.
#                "nolt=LEXP_NO_LT_EPILOGUES=1").
# Writes OUT_DIR/{torch.json,lexp.json,compare.json,compare.png,log.txt}: compare.json has per
# workload the median step times and speedup_vs_sdpa / speedup_vs_eager (torch ms / lexp ms).
# Exit status: lexp's (a failed baseline is logged and lexp still runs, without comparison).
set -u
OUT=${1:?usage: bench/step_compare.sh OUT_DIR [MODEL] [SEQS]}
MODEL=${2:-opt-1.3b}
SEQS=${3:-512,1024}
BATCH=${BATCH:-4}
ITERS=${ITERS:-25}
WARMUP=${WARMUP:-5}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
MP=()
[ -n "${MAX_POSITIONS:-}" ] && MP=(--max-positions "$MAX_POSITIONS")
[ -n "${PEFT:-}" ] && MP+=(--peft "$PEFT")
MP+=(--lora-alpha "${LORA_ALPHA:-32}")
. bench/gpu_env.sh lexp || exit 2

{
  echo "== bench/step_compare.sh $OUT $MODEL $SEQS (batch $BATCH, $WARMUP warm-up + $ITERS timed steps)"
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "cpu cores: $(nproc)"
  $BIN/lexp --version
} > "$LOG" 2>&1

echo "== torch baseline" >> "$LOG"
t0=$(date +%s)
PYTHONUNBUFFERED=1 timeout 270 python3 bench/torch_baseline.py --model "$MODEL" --batch "$BATCH" \
  --seq "$SEQS" --attn "${ATTNS:-sdpa,eager}" --iters "$ITERS" --warmup "$WARMUP" --out "$OUT/torch.json" \
  "${MP[@]}" >> "$LOG" 2>&1
echo "torch baseline exit status $? ($(( $(date +%s) - t0 )) s)" >> "$LOG"

echo "== lexp bench step" >> "$LOG"
BASE=()
[ -s "$OUT/torch.json" ] && BASE=(--baseline "$OUT/torch.json" --compare "$OUT/compare.json")
COMMIT=()
[ -n "${LEXP_COMMIT:-}" ] && COMMIT=(--commit "$LEXP_COMMIT")
t0=$(date +%s)
timeout 240 $BIN/lexp bench step --device "$DEVICE" --model "$MODEL" --batch "$BATCH" --seq "$SEQS" "${MP[@]}" \
  --iters "$ITERS" --warmup "$WARMUP" --json "$OUT/lexp.json" --png "$OUT/compare.png" \
  "${BASE[@]}" "${COMMIT[@]}" >> "$LOG" 2>&1
rc=$?
echo "lexp bench step exit status $rc ($(( $(date +%s) - t0 )) s)" >> "$LOG"
if [ -n "${ALSO_ATTENTION:-}" ]; then
  A=$ALSO_ATTENTION
  echo "== lexp bench step --attention $A" >> "$LOG"
  BASE=()
  [ -s "$OUT/torch.json" ] && BASE=(--baseline "$OUT/torch.json" --compare "$OUT/compare-$A.json")
  t0=$(date +%s)
  timeout 240 $BIN/lexp bench step --device "$DEVICE" --model "$MODEL" --batch "$BATCH" --seq "$SEQS" "${MP[@]}" \
    --iters "$ITERS" --warmup "$WARMUP" --attention "$A" --json "$OUT/lexp-$A.json" \
    --png "$OUT/compare-$A.png" "${BASE[@]}" "${COMMIT[@]}" >> "$LOG" 2>&1
  echo "lexp bench step --attention $A exit status $? ($(( $(date +%s) - t0 )) s)" >> "$LOG"
fi
if [ -n "${ALSO_LEXP:-}" ]; then
  IFS=';' read -ra RUNS <<< "$ALSO_LEXP"
  for run in "${RUNS[@]}"; do
    L=${run%%=*}
    read -ra TOKS <<< "${run#*=}"
    # Leading VAR=value tokens are environment settings of that run, the rest lexp flags.
    ENVS=(); FLAGS=()
    for tok in "${TOKS[@]}"; do
      if [ ${#FLAGS[@]} -eq 0 ] && [[ $tok =~ ^[A-Z_][A-Z0-9_]*= ]]; then ENVS+=("$tok"); else FLAGS+=("$tok"); fi
    done
    echo "== ${ENVS[*]} lexp bench step ${FLAGS[*]} ($L)" >> "$LOG"
    BASE=()
    [ -s "$OUT/torch.json" ] && BASE=(--baseline "$OUT/torch.json" --compare "$OUT/compare-$L.json")
    t0=$(date +%s)
    timeout 240 env "${ENVS[@]}" $BIN/lexp bench step --device "$DEVICE" --model "$MODEL" --batch "$BATCH" --seq "$SEQS" "${MP[@]}" \
      --iters "$ITERS" --warmup "$WARMUP" "${FLAGS[@]}" --json "$OUT/lexp-$L.json" \
      --png "$OUT/compare-$L.png" "${BASE[@]}" "${COMMIT[@]}" >> "$LOG" 2>&1
    echo "lexp bench step ($L) exit status $? ($(( $(date +%s) - t0 )) s)" >> "$LOG"
  done
fi
tail -n 12 "$LOG"
exit $rc
