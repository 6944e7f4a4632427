#!/bin/bash
# Session 10, call 5: the split dk/dv in 64-query steps on sm_90.
set -u
R=/tmp/r62; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_flash heads_of_80 --nocapture --test-threads 1 > $R/gpu_flash-80.txt 2>&1; echo "exit $?" >> $R/gpu_flash-80.txt
timeout 60 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
timeout 60 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/*.txt
grep "32x80 4x1024 dkdv" $R/gpu_flash-timed.txt | cut -c1-140
unset LEXP_GPU_TESTS
ITERS=15 WARMUP=3 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/opt27 opt-2.7b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/opt27/log.txt | tail -8
cd /tmp && tar czf $OUT/r.tgz r62
