#!/bin/bash
# Session 11, call 7: the block-sparse attention kernels on TMA tiles in the engine: checks,
# kernels alone against SDPA (dense and 25% / 10% of the causal blocks), the long-context step
# with synthetic attention lists against PyTorch + PEFT.
set -u
R=/tmp/r69; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine gpu_sparse_attention || exit 2
export LEXP_GPU_TESTS=1
timeout 100 $BIN/gpu_sparse_attention matches --nocapture --test-threads 1 > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/*.txt
unset LEXP_GPU_TESTS
DENSITIES=0.25,0.1 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -12 $R/attn/log.txt
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=16384 ALSO_LEXP="attn25=--synthetic-attn-density 0.25;attn10=--synthetic-attn-density 0.1" bench/step_compare.sh $R/long opt-1.3b 8192,16384 > /dev/null 2>&1
grep -A5 "vs sdpa" $R/long/log.txt | tail -18
cd /tmp && tar czf $OUT/r.tgz r69
