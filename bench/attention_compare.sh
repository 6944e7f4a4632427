#!/bin/bash
# Dense flash attention against PyTorch SDPA in one GPU call (the attention-exposure issue's
# dense-speed target: forward + backward within 1.3x of SDPA at 4k and 16k tokens, head
# dimensions 64 and 128). From the repository root on the GPU machine, with the release
# `lexp` compressed to .gpu/lexp.gz or .gpu/lexp.xz (bench/gpu_env.sh):
#   bench/attention_compare.sh OUT_DIR [SEQS] [HEAD_DIMS]
# WIDTH (default 2048, OPT-1.3B) is the model width: WIDTH / hd heads (2560 for OPT-2.7B's 80).
# With DENSITIES (e.g. 0.25,0.1) the block-sparse kernels run too, on synthetic random masks
# at those densities of the causal blocks (the sparse-speed target: 0.35x / 0.18x of SDPA).
# Writes OUT_DIR/{sdpa.json,lexp.json,log.txt}.
set -u
OUT=${1:?usage: bench/attention_compare.sh OUT_DIR [SEQS] [HEAD_DIMS]}
SEQS=${2:-4096,16384}
HDS=${3:-64,128}
WIDTH=${WIDTH:-2048}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
. bench/gpu_env.sh lexp || { echo "no .gpu/lexp binary" | tee "$LOG"; exit 2; }
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$LOG" 2>&1
echo "== torch SDPA" >> "$LOG"
timeout 240 python3 bench/attention_baseline.py --seq "$SEQS" --head-dim "$HDS" --width "$WIDTH" --out "$OUT/sdpa.json" >> "$LOG" 2>&1
echo "exit $?" >> "$LOG"
echo "== lexp bench attention" >> "$LOG"
BASE=()
[ -s "$OUT/sdpa.json" ] && BASE=(--baseline "$OUT/sdpa.json")
[ -n "${DENSITIES:-}" ] && BASE+=(--densities "$DENSITIES")
timeout 240 "$BIN/lexp" bench attention --seq "$SEQS" --head-dim "$HDS" --width "$WIDTH" "${BASE[@]}" \
  --json "$OUT/lexp.json" >> "$LOG" 2>&1
rc=$?
echo "exit $rc" >> "$LOG"
tail -n 8 "$LOG"
exit $rc
