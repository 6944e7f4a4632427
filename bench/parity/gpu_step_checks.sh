#!/usr/bin/env bash
# One device call's worth of GPU checks and step measurements (run from the repository root on
# the GPU machine, with the release binaries built on the dev machine and gzipped into .gpu/):
#  1. the opt-in GPU test binaries named in TESTS (each .gpu/NAME.gz, run with LEXP_GPU_TESTS=1);
#  2. `lexp check --kernel K` on the GPU for each K in CHECK_KERNELS (outputs poisoned, every
#     tile configuration against the CPU reference);
#  3. the OPT-1.3B step against PyTorch + PEFT (bench/step_compare.sh; A/B lexp runs from
#     ALSO_LEXP, see that script), for the sequence lengths in SEQS;
#     with LONG=1 also 1 x 4096 and 1 x 8192 tokens (both sides built with 8192 positions),
#     with OPT27=1 also OPT-2.7B at 4 x 512 and 4 x 1024;
#     with ATTN=1 also block-sparse attention: the kernels against SDPA at 4k and 16k tokens
#     (dense and synthetic 25% / 10% masks, bench/attention_compare.sh), and the OPT-1.3B step
#     at 1 x 8192 and 1 x 16384 with synthetic 25% / 10% attention masks against SDPA;
#  4. with PROFILE=1, `lexp bench step --profile` at 4 x 1024;
#  5. `lexp finetune` with no arguments, timed.
# Usage: TESTS="gpu_optimizer gpu_engine gpu_engine:LEXP_NO_LT_EPILOGUES=1" CHECK_KERNELS="adamw" ALSO_LEXP="hostopt=--host-optimizer" \
#          bench/parity/gpu_step_checks.sh OUT
# Everything lands under OUT (and OUT.tar.gz, one file to bring back).
set -uo pipefail
OUT=$1; mkdir -p "$OUT"; BIN=/tmp/lexp-bin; mkdir -p $BIN
# Packed after every phase, so that a run cut short still brings back what it measured.
pack() { tar czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"; }
for b in lexp ${TESTS:-}; do b=${b%%:*}; [ -x $BIN/$b ] || gunzip -c .gpu/$b.gz > $BIN/$b || exit 2; done
chmod +x $BIN/*
CUBLAS_DIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/libcu[rb][al][na][ds]*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH=${CUBLAS_DIRS}:${LD_LIBRARY_PATH:-}
export LEXP_CACHE=/tmp/lexp-cache
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; $BIN/lexp --version; } > "$OUT/machine.txt" 2>&1
# A test entry NAME:VAR=value runs NAME's binary with that environment (test-NAME-VAR.txt).
for entry in ${TESTS:-}; do
  t=${entry%%:*}; envs=(); log="$OUT/test-$t.txt"
  if [ "$entry" != "$t" ]; then envs=("${entry#*:}"); log="$OUT/test-$t-${envs[0]%%=*}.txt"; fi
  env LEXP_GPU_TESTS=1 "${envs[@]}" timeout 240 $BIN/$t --nocapture --test-threads=1 > "$log" 2>&1
  echo "exit $?" >> "$log"
  pack
done
for k in ${CHECK_KERNELS:-}; do
  timeout 120 $BIN/lexp check --kernel "$k" > "$OUT/check-$k.txt" 2>&1
  echo "exit $?" >> "$OUT/check-$k.txt"
done
if [ -n "${SEQS-512,1024}" ]; then
  bench/step_compare.sh "$OUT/step" opt-1.3b "${SEQS:-512,1024}" > /dev/null 2>&1
  pack
fi
if [ "${LONG:-0}" = 1 ]; then
  BATCH=1 MAX_POSITIONS=8192 ITERS=15 bench/step_compare.sh "$OUT/step-long" opt-1.3b 4096,8192 \
    > /dev/null 2>&1
  pack
fi
if [ "${OPT27:-0}" = 1 ]; then
  bench/step_compare.sh "$OUT/step-2.7b" opt-2.7b 512,1024 > /dev/null 2>&1
  pack
fi
if [ "${ATTN:-0}" = 1 ]; then
  DENSITIES=0.25,0.1 bench/attention_compare.sh "$OUT/attention" > /dev/null 2>&1
  pack
  BATCH=1 MAX_POSITIONS=16384 ITERS=15 WARMUP=3 ATTNS=sdpa \
    ALSO_LEXP="attn25=--synthetic-attn-density 0.25;attn10=--synthetic-attn-density 0.1" \
    bench/step_compare.sh "$OUT/step-attn" opt-1.3b 8192,16384 > /dev/null 2>&1
  pack
fi
if [ "${PROFILE:-0}" = 1 ]; then
  timeout 200 $BIN/lexp bench step --model opt-1.3b --seq 1024 --iters 10 --warmup 3 \
    --profile "$OUT/profile.json" > "$OUT/profile.txt" 2>&1
  echo "exit $?" >> "$OUT/profile.txt"
  pack
fi
t0=$(date +%s%N)
$BIN/lexp finetune --output /tmp/default > "$OUT/default.log" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/default.log"
tail -n 3 "$OUT"/*.txt "$OUT"/*.log
tail -n 14 "$OUT"/step*/log.txt 2>/dev/null
pack
