#!/bin/bash
# Session 17, call 2: the retuned flash configurations (dk/dv of heads of 64 one-warpgroup in 2
# stages at every length; heads of 128 one-warpgroup dk/dv from 4096 tokens and 128-query dq
# from 16384). Every flash configuration against the f64 reference, gpu_engine, then attention
# alone against SDPA (heads of 64 and 128, dense and block-sparse at 25% / 10%).
set -u
R=/tmp/r114; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
DENSITIES=0.25,0.1 timeout 150 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -14 $R/attn/log.txt
(cd /tmp && tar czf $OUT/r.tgz r114)
export LEXP_GPU_TESTS=1
timeout 280 $BIN/gpu_flash --nocapture --test-threads 1 --skip timed > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
grep -c "0 non-finite mismatches, 0 unwritten" $R/gpu_flash.txt
cd /tmp && tar czf $OUT/r.tgz r114
