#!/bin/bash
# Session 18, call 2: the same binary as call 117 (commit to come: dk/dv `ctas = 3`), on a fresh
# machine: the sparse MLP's four products against cuBLAS (issue 6, point 4; a first process on
# a fresh machine, then a second), then the tensor-core benchmark (issue 3: dense GEMM,
# block-sparse GEMM, fused LoRA, each checked against the CPU reference first).
set -u
R=/tmp/r118; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for i in 1 2; do
  timeout 100 $BIN/lexp bench mlp --block 128,64 --density 0.25,0.5,1.0 --json $R/mlp$i.json > $R/mlp$i.txt 2>&1; echo "exit $?" >> $R/mlp$i.txt
  grep -E "0\.250|0\.500|exit" $R/mlp$i.txt | head -12
  (cd /tmp && tar czf $OUT/r.tgz r118)
done
timeout 150 $BIN/lexp bench matmul --json $R/matmul.json > $R/matmul.txt 2>&1; echo "exit $?" >> $R/matmul.txt
tail -40 $R/matmul.txt
(cd /tmp && tar czf $OUT/r.tgz r118)
