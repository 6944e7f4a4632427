#!/bin/bash
# Session 13, call 3: the engine with 128-key flash tiles for heads of 128 on sm_90:
# gpu_engine (its heads-of-128 case runs FLASH_128), and dense attention against SDPA with the
# engine's tiles (heads of 64 and 128, 4096 and 16384 tokens) in the same call.
set -u
R=/tmp/r83; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 60 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
timeout 110 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
cd /tmp && tar czf $OUT/r.tgz r83
