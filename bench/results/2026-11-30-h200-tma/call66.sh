#!/bin/bash
# Session 11, call 4: flash attention (dense and block-sparse) with TMA variants: every
# configuration against the reference, then every configuration timed at OPT sizes.
set -u
R=/tmp/r66; mkdir -p $R
. bench/gpu_env.sh gpu_flash gpu_sparse_attention || exit 2
export LEXP_GPU_TESTS=1
timeout 100 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
timeout 120 $BIN/gpu_sparse_attention --nocapture --test-threads 1 > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
timeout 300 $BIN/gpu_flash matches_the_reference --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -h "test result\|^exit\|panicked" $R/*.txt
grep "4x1024" $R/gpu_flash-timed.txt | sed 's/("W", 8), //' | cut -c1-120
cd /tmp && tar czf $OUT/r.tgz r66
