#!/bin/bash
# Session 12, call 6: the final code's OPT-1.3B steps against PEFT + SDPA and eager in one run
# (4 x 512, 4 x 1024; direct, graph, synthetic 25% MLP lists with graph), and the MLP bench.
set -u
R=/tmp/r79; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
ITERS=20 WARMUP=5 ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" bench/step_compare.sh $R/step opt-1.3b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/step/log.txt | tail -15
timeout 120 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/mlp.json > $R/mlp.txt 2>&1
sed -n '/dense cuBLAS/,$p' $R/mlp.txt | grep -v "^wrote"
cd /tmp && tar czf $OUT/r.tgz r79
