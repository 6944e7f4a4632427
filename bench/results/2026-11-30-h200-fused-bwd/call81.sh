#!/bin/bash
# Session 13, call 1: the fused flash backward (dq added atomically in the dk/dv kernel).
# Every flash configuration timed (fused against delta + dkdv + dq), attention alone against
# SDPA (the engine's choice: fused), OPT-1.3B 4 x 1024 steps against PEFT + SDPA with the
# fused backward, the deterministic one (A/B), graph-replayed, and 25% synthetic MLP lists.
set -u
R=/tmp/r81; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
export LEXP_GPU_TESTS=1
timeout 100 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "test result|^exit|panicked" $R/gpu_flash-timed.txt
grep -E "(4x1024|1x16384) " $R/gpu_flash-timed.txt | grep -E "TMA\", 1|delta" | sed 's/("W", 8), //; s/("TMA", 1), //' | cut -c1-100
unset LEXP_GPU_TESTS
timeout 130 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="det=LEXP_DETERMINISTIC_ATTENTION=1;graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 200 bench/step_compare.sh $R/step opt-1.3b 1024 > /dev/null 2>&1
grep -A7 "vs sdpa" $R/step/log.txt | tail -9
cd /tmp && tar czf $OUT/r.tgz r81
