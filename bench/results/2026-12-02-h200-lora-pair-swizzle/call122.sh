#!/bin/bash
# Session 19, call 4: sparse_out (output blocks selected, fc1 forward) with program-id
# swizzling as a tuning choice (G = 1: slot pairs of one row group first, as before; G = 8:
# eight row groups at a time), against dense cuBLAS in the same run, two processes; the
# kernels checked against the CPU reference first (lexp bench matmul does).
set -u
R=/tmp/r122; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for i in 1 2; do
  timeout 200 $BIN/lexp bench matmul --only sparse --json $R/sparse$i.json > $R/sparse$i.txt 2>&1; echo "exit $?" >> $R/sparse$i.txt
  grep -E "passed|failed" $R/sparse$i.txt | tail -2
  grep -A22 "^mode " $R/sparse$i.txt
  (cd /tmp && tar czf $OUT/r.tgz r122)
done
