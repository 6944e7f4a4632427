#!/bin/bash
# Session 14, call 9: cuBLASLt algorithms timed on first use (up to 8 heuristic candidates) and
# the layers' input-gradient GEMMs routed through cuBLASLt (no epilogue): the engine against
# the CPU engine (gpu_engine) and the cuBLASLt wrapper's GPU tests (gpu_cublaslt).
set -u
R=/tmp/r93; mkdir -p $R
. bench/gpu_env.sh gpu_engine gpu_cublaslt || exit 2
export LEXP_GPU_TESTS=1
timeout 150 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
timeout 120 $BIN/gpu_cublaslt --nocapture --test-threads 1 > $R/gpu_cublaslt.txt 2>&1; echo "exit $?" >> $R/gpu_cublaslt.txt
grep -h "test result\|^exit\|panicked\|^test " $R/gpu_cublaslt.txt
cd /tmp && tar czf $OUT/r.tgz r93
