#!/bin/bash
# Session 13, call 2: 128-key tiles for heads of 128 (dk/dv BN 128 with 32/64-query steps,
# dq with 128 queries, forward with 128-key steps; sm_90 only where sm_80 spills): every flash
# configuration timed, PyTorch SDPA at heads of 128 in the same call, then every configuration
# against the f64 reference.
set -u
R=/tmp/r82; mkdir -p $R
. bench/gpu_env.sh gpu_flash || exit 2
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "test result|^exit|panicked" $R/gpu_flash-timed.txt
grep -E "^16x128 " $R/gpu_flash-timed.txt | grep -E "TMA\", 1|delta" | sed 's/("W", 8), //; s/("TMA", 1), //; s/("D", 128), //' | cut -c1-90
timeout 90 python3 bench/attention_baseline.py --seq 4096,16384 --head-dim 128 --width 2048 --out $R/sdpa.json > $R/sdpa.txt 2>&1; echo "exit $?" >> $R/sdpa.txt
tail -4 $R/sdpa.txt
timeout 240 $BIN/gpu_flash matches_the_reference --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
cd /tmp && tar czf $OUT/r.tgz r82
