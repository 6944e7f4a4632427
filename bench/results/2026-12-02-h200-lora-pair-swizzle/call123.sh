#!/bin/bash
# Session 19, call 5: as call 4 (sparse_out with program-id swizzling G = 1 or 8 as a tuning
# choice), with the chosen tile also timed in the other program order (G 1 <-> 8) at every
# density in the same process (rows "sparse_out, other G"), against dense cuBLAS in the same
# run, two processes; the kernels checked against the CPU reference first.
set -u
R=/tmp/r123; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for i in 1 2; do
  timeout 200 $BIN/lexp bench matmul --only sparse --json $R/sparse$i.json > $R/sparse$i.txt 2>&1; echo "exit $?" >> $R/sparse$i.txt
  grep -E "passed|failed" $R/sparse$i.txt | tail -2
  grep -A32 "^mode " $R/sparse$i.txt
  (cd /tmp && tar czf $OUT/r.tgz r123)
done
