#!/bin/bash
# Session 14, call 2: the LoRA fold in both directions (du beside dqkv, one input-gradient GEMM
# with K = 3H + kc): the engine against the CPU engine (every test of gpu_engine).
set -u
R=/tmp/r86; mkdir -p $R
. bench/gpu_env.sh gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 150 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked\|^test " $R/gpu_engine.txt
cd /tmp && tar czf $OUT/r.tgz r86
