#!/bin/bash
# Session 15, call 3: sparse_fc2_fwd (the sparse MLP's fc2 product with bias and residual in
# its epilogue) inside the engine: gpu_engine (its sparse-MLP case against the CPU model) and
# gpu_peft (Houlsby adapters with a sparse MLP: the unfused path).
set -u
R=/tmp/r98; mkdir -p $R
. bench/gpu_env.sh gpu_engine gpu_peft || exit 2
export LEXP_GPU_TESTS=1
timeout 150 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
timeout 150 $BIN/gpu_peft --nocapture --test-threads 1 > $R/gpu_peft.txt 2>&1; echo "exit $?" >> $R/gpu_peft.txt
grep -h "test result\|^exit\|panicked" $R/gpu_peft.txt
cd /tmp && tar czf $OUT/r.tgz r98
