#!/bin/bash
# GPU-machine run of the GPU training engine: its tests against the CPU engine, the default
# `lexp finetune` timed on the GPU and on the CPU, and (with BENCH=1) the OPT-1.3B step-time
# benchmark against PyTorch + PEFT.
#
# Usage, from the repository root on the GPU machine, with release binaries built here and
# gzipped into .gpu/ (`lexp` and the `gpu_engine` test binary):
#   bench/gpu_engine_checks.sh OUT_DIR [BENCH]
# Writes into OUT_DIR: gpu_engine_tests.txt, finetune-cuda.txt, finetune-cpu.txt,
# finetune-cuda-metrics.jsonl and, with BENCH=1, torch_step.json, lexp_step.json, bench.txt.
# Runs the timings even when a test fails (the exit status is the tests').
set -u
OUT=${1:?usage: bench/gpu_engine_checks.sh OUT_DIR [BENCH]}
BENCH=${2:-0}
mkdir -p "$OUT"
BIN=/tmp/lexp-bin
mkdir -p $BIN
gunzip -c .gpu/lexp.gz > $BIN/lexp && gunzip -c .gpu/gpu_engine.gz > $BIN/gpu_engine || exit 2
chmod +x $BIN/lexp $BIN/gpu_engine
# libcublas from PyTorch's pip wheels (cuda 13: site-packages/nvidia/cu13/lib).
CUBLAS_DIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/libcublas.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH=${CUBLAS_DIRS}:${LD_LIBRARY_PATH:-}

T="$OUT/gpu_engine_tests.txt"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc
  git log --oneline -1 2>/dev/null
} > "$T"
# The training kernels on this GPU against their CPU references first (they are new).
for k in bias_add bias_relu embedding_fwd causal_softmax softmax_bwd xent_fwd_bwd; do
  echo "== lexp check --kernel $k (failing rows and summary)" >> "$T"
  timeout 60 $BIN/lexp check --kernel $k > /tmp/check-$k.txt 2>&1
  grep -v " ok$" /tmp/check-$k.txt | tail -12 >> "$T"
done
LEXP_GPU_TESTS=1 timeout 240 $BIN/gpu_engine --nocapture --test-threads=1 >> "$T" 2>&1
rc=$?
echo "gpu_engine tests exit status $rc" | tee -a "$T"
TESTS_RC=$rc

for dev in cuda cpu; do
  F="$OUT/finetune-$dev.txt"
  rm -rf /tmp/run-$dev
  t0=$(date +%s.%N)
  timeout 150 $BIN/lexp finetune --device $dev --output /tmp/run-$dev > "$F" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  echo "exit status $rc; wall $(python3 -c "print(f'{$t1 - $t0:.2f}')") s" >> "$F"
  tail -3 "$F"
done
cp /tmp/run-cuda/metrics.jsonl "$OUT/finetune-cuda-metrics.jsonl" 2>/dev/null

if [ "$BENCH" = 1 ]; then
  B="$OUT/bench.txt"
  LEXP_GPU_BENCH=1 LEXP_BENCH_OUT="$OUT/lexp_step.json" timeout 200 \
    $BIN/gpu_engine opt_1_3b_step_time --nocapture > "$B" 2>&1
  echo "lexp bench exit status $?" >> "$B"
  PYTHONUNBUFFERED=1 timeout 240 python3 bench/torch_baseline.py "$OUT/torch_step.json" >> "$B" 2>&1
  echo "torch baseline exit status $?" >> "$B"
  tail -8 "$B"
fi
exit $TESTS_RC
