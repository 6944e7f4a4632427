#!/bin/bash
# Session 11, call 1: TMA GEMM variants: correctness against the CPU reference, then timing.
set -u
R=/tmp/r63; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $R/gpu.txt
timeout 300 $BIN/lexp bench matmul --only gemm --iters 30 --json $R/matmul.json > $R/matmul.txt 2>&1; echo "exit $?" >> $R/matmul.txt
tail -60 $R/matmul.txt
cd /tmp && tar czf $OUT/r.tgz r63
