#!/bin/bash
# Session 14, call 7: the fold's backward with one reduce launch per layer (dB passes 16 wide),
# lora_fold with A and B programs apart: the engine against the CPU engine (every test of gpu_engine).
set -u
R=/tmp/r91; mkdir -p $R
. bench/gpu_env.sh gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 150 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked\|^test " $R/gpu_engine.txt
cd /tmp && tar czf $OUT/r.tgz r91
