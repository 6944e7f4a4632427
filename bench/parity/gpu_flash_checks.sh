#!/usr/bin/env bash
# GPU-machine checks of flash attention (run from the repository root there):
#  1. the flash-attention kernels against the f64 CPU reference (runtime/tests/gpu_flash.rs);
#  2. the GPU engine's tests against the CPU engine, flash and materialised attention
#     (runtime/tests/gpu_engine.rs);
#  3. the OPT-1.3B step against PyTorch + PEFT (bench/step_compare.sh), with a second lexp run
#     on materialised attention for an A/B in the same call;
#  4. `lexp finetune` with no arguments, timed.
# Usage: bench/parity/gpu_flash_checks.sh OUT
#   (with .gpu/lexp.gz, .gpu/gpu_engine.gz and .gpu/gpu_flash.gz built on the dev machine)
set -uo pipefail
OUT=$1; mkdir -p "$OUT"; BIN=/tmp/lexp-bin; mkdir -p $BIN
for b in lexp gpu_engine gpu_flash; do gunzip -c .gpu/$b.gz > $BIN/$b || exit 2; done
chmod +x $BIN/*
CUBLAS_DIRS=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + '/**/libcu[rb][al][na][ds]*.so*', recursive=True)})))" 2>/dev/null)
export LD_LIBRARY_PATH=${CUBLAS_DIRS}:${LD_LIBRARY_PATH:-}
export LEXP_CACHE=/tmp/lexp-cache
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; } > "$OUT/machine.txt"
LEXP_GPU_TESTS=1 timeout 120 $BIN/gpu_flash --nocapture > "$OUT/gpu_flash_tests.txt" 2>&1
echo "exit $?" >> "$OUT/gpu_flash_tests.txt"
LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_engine --nocapture --test-threads=1 > "$OUT/gpu_engine_tests.txt" 2>&1
echo "exit $?" >> "$OUT/gpu_engine_tests.txt"
ALSO_ATTENTION=materialised bench/step_compare.sh "$OUT/step" opt-1.3b 512,1024 > /dev/null 2>&1
t0=$(date +%s%N)
$BIN/lexp finetune --output /tmp/default > "$OUT/default.log" 2>&1
echo "exit $? wall $(( ($(date +%s%N) - t0) / 1000000 )) ms" >> "$OUT/default.log"
tail -n 4 "$OUT"/*.txt "$OUT"/*.log "$OUT"/step/log.txt
