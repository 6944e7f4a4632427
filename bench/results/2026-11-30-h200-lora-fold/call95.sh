#!/bin/bash
# Session 14, call 11: the dense path as the final code runs it (algorithm timing off,
# LEXP_LT_AUTOTUNE=0: call 94 found it no faster, and it is removed after this call): OPT-1.3B
# 1 x 4096 and 1 x 8192 against PEFT + SDPA, and a second 4 x 1024 sample.
set -u
R=/tmp/r95; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
export LEXP_LT_AUTOTUNE=0
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" timeout 200 bench/step_compare.sh $R/long opt-1.3b 4096,8192 > /dev/null 2>&1
grep -E "^==|^1x(4096|8192)  " $R/long/log.txt | grep -v "^== torch"
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph" timeout 120 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
cd /tmp && tar czf $OUT/r.tgz r95
