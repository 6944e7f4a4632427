#!/bin/bash
# The Long Exposure paper's end-to-end table (its Figure 7 setting) in one call on the GPU
# machine: OPT-1.3B and/or OPT-2.7B (random weights), 512 and 1024 tokens, batch 4, each PEFT
# method (LoRA r=4 alpha 8 on q,v; Houlsby adapters of 64; BitFit, every bias), on the paper's
# tokenized E2E data (../shared/data/e2e-paper/valid_opt.jsonl), four columns:
#   - HF PEFT eager  (PyTorch + transformers + PEFT, eager attention: the paper's baseline),
#   - HF PEFT SDPA   (the same with SDPA attention),
#     both in the paper's padded setting: 4 examples per step, each right-padded to 512/1024
#     tokens with an attention mask (bench/torch_baseline.py --data);
#   - lexp dense     (`lexp bench step --data`: whole examples packed into the same 4 x 512 /
#     4 x 1024 token budget, each its own sequence),
#   - lexp exposure  (the same with the MLP on the block-sparse kernels over RANDOM block
#     lists keeping 25% of each 128-token group's 128-neuron blocks: a SYNTHETIC predictor,
#     as the paper's artifact capped the MLP at 25% of its blocks; random weights have no
#     activation sparsity to predict).
# Loss on the completion tokens on both sides. bench/paper_table.py joins the JSONs into
# paper-table.{json,md,png}.
#
# Usage, from the repository root on the GPU machine, with the release `lexp` binary built on
# the development machine and compressed to .gpu/lexp.gz or .gpu/lexp.xz:
#   bench/paper_table.sh OUT_DIR [MODELS] [METHODS]
#     MODELS:  comma-separated, default opt-1.3b,opt-2.7b
#     METHODS: comma-separated, default lora,houlsby,bitfit
#   Environment: ITERS (default 20), WARMUP (default 5), DATA (the JSONL file), SEQS (default
#                512,1024), DENSITY (default 0.25), LEXP_COMMIT.
# Writes OUT_DIR/{torch,lexp-dense,lexp-exposure}-MODEL-METHOD.json, log.txt, and the table.
set -u
OUT=${1:?usage: bench/paper_table.sh OUT_DIR [MODELS] [METHODS]}
MODELS=${2:-opt-1.3b,opt-2.7b}
METHODS=${3:-lora,houlsby,bitfit}
ITERS=${ITERS:-20}
WARMUP=${WARMUP:-5}
SEQS=${SEQS:-512,1024}
DENSITY=${DENSITY:-0.25}
DATA=${DATA:-../shared/data/e2e-paper/valid_opt.jsonl}
[ -f "$DATA" ] || DATA=shared/data/e2e-paper/valid_opt.jsonl
mkdir -p "$OUT"
LOG="$OUT/log.txt"
. bench/gpu_env.sh lexp || exit 2
{
  echo "== bench/paper_table.sh $OUT $MODELS $METHODS (seqs $SEQS, batch 4, $WARMUP warm-up + $ITERS timed steps, data $DATA)"
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $BIN/lexp --version
} > "$LOG" 2>&1
[ -f "$DATA" ] || { echo "no data file $DATA" | tee -a "$LOG"; exit 2; }
status=0
for model in ${MODELS//,/ }; do
  for method in ${METHODS//,/ }; do
    echo "== $model $method: torch (eager, sdpa; padded)" >> "$LOG"
    t0=$(date +%s)
    PYTHONUNBUFFERED=1 timeout 240 python3 bench/torch_baseline.py --model "$model" --batch 4 \
      --seq "$SEQS" --attn eager,sdpa --peft "$method" --data "$DATA" --iters "$ITERS" \
      --warmup "$WARMUP" --out "$OUT/torch-$model-$method.json" >> "$LOG" 2>&1 || status=1
    echo "   torch: $(( $(date +%s) - t0 )) s" >> "$LOG"
    for mode in dense exposure; do
      extra=()
      [ "$mode" = exposure ] && extra=(--synthetic-mlp-density "$DENSITY")
      echo "== $model $method: lexp $mode (packed)" >> "$LOG"
      t0=$(date +%s)
      timeout 240 $BIN/lexp bench step --model "$model" --batch 4 --seq "$SEQS" --peft "$method" \
        --data "$DATA" --iters "$ITERS" --warmup "$WARMUP" ${LEXP_COMMIT:+--commit "$LEXP_COMMIT"} \
        "${extra[@]}" --json "$OUT/lexp-$mode-$model-$method.json" >> "$LOG" 2>&1 || status=1
      echo "   lexp $mode: $(( $(date +%s) - t0 )) s" >> "$LOG"
    done
  done
done
python3 bench/paper_table.py "$OUT" >> "$LOG" 2>&1 || status=1
exit $status
