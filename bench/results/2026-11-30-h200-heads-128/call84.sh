#!/bin/bash
# Session 13, call 4: heads of 128 with 3-stage dk/dv (128 x 64) and dq (128 queries), heads of
# 64 with 128-key dq steps: every flash configuration timed, then every configuration against
# the f64 reference.
set -u
R=/tmp/r84; mkdir -p $R
. bench/gpu_env.sh gpu_flash || exit 2
export LEXP_GPU_TESTS=1
timeout 60 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "test result|^exit|panicked" $R/gpu_flash-timed.txt
grep -E "^(16x128|32x64) (4x1024|1x4096|1x16384) dq|^16x128 (4x1024|1x4096|1x16384) dkdv" $R/gpu_flash-timed.txt | grep -E "TMA\", 1" | grep -E "BM\", 128|BN\", 128" | sed 's/("W", 8), //; s/("TMA", 1), //' | cut -c1-96
timeout 170 $BIN/gpu_flash matches_the_reference --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
cd /tmp && tar czf $OUT/r.tgz r84
