#!/bin/bash
# Session 10, call 3: the final code on OPT-1.3B (dense rows of the dense-step issue) and the
# full flash-kernel check.
set -u
R=/tmp/r60; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 200 $BIN/gpu_flash matches --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
timeout 60 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_flash.txt $R/gpu_engine.txt
grep "rel_l2" $R/gpu_flash.txt | awk '{for(i=1;i<=NF;i++) if($i=="rel_l2") print $(i+1)}' | sort -g | tail -1
unset LEXP_GPU_TESTS
ITERS=20 WARMUP=5 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/step opt-1.3b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/step/log.txt | tail -8
BATCH=1 ITERS=15 WARMUP=3 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/long opt-1.3b 4096,8192 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/long/log.txt | tail -8
timeout 40 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile.json > $R/profile.txt 2>&1; sed -n 3,10p $R/profile.txt
cd /tmp && tar czf $OUT/r.tgz r60
