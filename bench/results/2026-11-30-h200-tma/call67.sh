#!/bin/bash
# Session 11, call 5: the engine on TMA flash kernels (head dimension 64) and TMA sparse MLP
# tiles: engine correctness, the dense and synthetic-MLP steps against PyTorch + PEFT,
# attention alone against SDPA, the four MLP products.
set -u
R=/tmp/r67; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
ITERS=20 WARMUP=5 ALSO_LEXP="graph=--cuda-graph;mlp25=--synthetic-mlp-density 0.25;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" bench/step_compare.sh $R/step opt-1.3b 512,1024 > /dev/null 2>&1
grep -A8 "vs sdpa" $R/step/log.txt | tail -16
BATCH=1 ITERS=15 WARMUP=3 ATTNS=sdpa MAX_POSITIONS=4096 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/long opt-1.3b 4096 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/long/log.txt | tail -6
bench/attention_compare.sh $R/attn 4096,16384 64 > /dev/null 2>&1; tail -4 $R/attn/log.txt
timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/mlp.json > $R/mlp.txt 2>&1; echo "exit $?" >> $R/mlp.txt
tail -6 $R/mlp.txt
cd /tmp && tar czf $OUT/r.tgz r67
