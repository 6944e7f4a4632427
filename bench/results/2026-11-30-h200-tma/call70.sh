#!/bin/bash
# Session 11, call 8: the run-to-run spread of the four MLP products and the sparse GEMMs on the
# final code (two MLP runs, one sparse-GEMM run).
set -u
R=/tmp/r70; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
for i in 1 2; do
  timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/mlp$i.json > $R/mlp$i.txt 2>&1; echo "exit $?" >> $R/mlp$i.txt
  tail -5 $R/mlp$i.txt | head -3
done
timeout 150 $BIN/lexp bench matmul --only sparse --no-check --iters 30 --json $R/matmul.json > $R/matmul.txt 2>&1; echo "exit $?" >> $R/matmul.txt
grep -A22 "^mode" $R/matmul.txt
cd /tmp && tar czf $OUT/r.tgz r70
