#!/bin/bash
# Session 12, call 4: the engine with dk/dv in 3 stages and 128-key forward steps from 4096
# tokens (heads of 64): gpu_engine, OPT-1.3B steps against PEFT + SDPA at 4 x 1024 and at
# 1 x 4096 / 8192 / 16384 (dense and 25% synthetic attention), attention alone against SDPA.
set -u
R=/tmp/r77; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" bench/step_compare.sh $R/step opt-1.3b 1024 > /dev/null 2>&1
grep -A6 "vs sdpa" $R/step/log.txt | tail -8
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=16384 ALSO_LEXP="graph=--cuda-graph;attn25=--synthetic-attn-density 0.25" bench/step_compare.sh $R/long opt-1.3b 4096,8192,16384 > /dev/null 2>&1
grep -A8 "vs sdpa" $R/long/log.txt | tail -12
bench/attention_compare.sh $R/attn 4096,8192,16384 64 > /dev/null 2>&1; tail -5 $R/attn/log.txt
cd /tmp && tar czf $OUT/r.tgz r77
