#!/bin/bash
# Session 12, call 3: ping-pong flash kernels (PP = 1): every configuration timed at OPT sizes
# and at 16k tokens (heads of 64 and 128), then checked against the reference; the MLP bench
# with the cuBLAS handle's own workspace (graph-replayed baseline).
set -u
R=/tmp/r76; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
export LEXP_GPU_TESTS=1
timeout 240 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "test result|^exit|panicked" $R/gpu_flash-timed.txt
grep -E "(4x1024|1x16384) " $R/gpu_flash-timed.txt | grep "TMA\", 1" | sed 's/("W", 8), //; s/("TMA", 1), //' | cut -c1-110
timeout 300 $BIN/gpu_flash matches_the_reference --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
unset LEXP_GPU_TESTS
timeout 120 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/mlp.json > $R/mlp.txt 2>&1
sed -n '/dense cuBLAS/,$p' $R/mlp.txt | grep -v "^wrote"
cd /tmp && tar czf $OUT/r.tgz r76
