#!/bin/bash
# Session 16, call 6: more one-warpgroup flash tiles. Dense dk/dv with heads of 64 in 32-query
# steps and in 4 stages; block-sparse dk/dv and dq in one warpgroup (heads of 64). Every dense
# configuration timed and checked against the f64 reference; the block-sparse kernels checked
# against the reference and timed at 16384 tokens, 25%.
set -u
R=/tmp/r111; mkdir -p $R
. bench/gpu_env.sh gpu_flash gpu_sparse_attention || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/timed.txt 2>&1; echo "exit $?" >> $R/timed.txt
grep -E "^32x64 (4x512|4x1024|1x4096|1x8192|1x16384) dkdv" $R/timed.txt | grep -E "TMA\", 1" | sed 's/("TMA", 1), //; s/("D", [0-9]*), //' | cut -c1-100
timeout 200 $BIN/gpu_sparse_attention --nocapture --test-threads 1 > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
grep -E "heads of 64, 25%" $R/gpu_sparse_attention.txt | grep -E "TMA\", 1" | sed 's/("TMA", 1)//; s/("D", 64), //; s/("KB", 128), //' | cut -c1-120
grep -E "test result|^exit|panicked" $R/gpu_sparse_attention.txt
timeout 220 $BIN/gpu_flash --nocapture --test-threads 1 --skip configurations_timed > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
cd /tmp && tar czf $OUT/r.tgz r111
