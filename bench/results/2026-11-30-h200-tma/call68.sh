#!/bin/bash
# Session 11, call 6: head dimension 128 on TMA flash kernels (attention alone against SDPA),
# the engine on it, OPT-1.3B at 1 x 8192, and a profile of the synthetic sparse-MLP step.
set -u
R=/tmp/r68; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
BATCH=1 ITERS=15 WARMUP=3 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/long opt-1.3b 8192 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/long/log.txt | tail -6
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --profile $R/profile-mlp25.json > $R/profile-mlp25.txt 2>&1; sed -n 3,30p $R/profile-mlp25.txt
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 3,12p $R/profile-dense.txt
cd /tmp && tar czf $OUT/r.tgz r68
