#!/bin/bash
# Session 12, call 5: the cross-entropy's second pass walks the row backwards (L2 hits):
# the kernel against the CPU reference on the GPU, gpu_engine, and a profiled 4 x 1024 step.
set -u
R=/tmp/r78; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
timeout 120 $BIN/lexp check --kernel xent_fwd_bwd > $R/check-xent.txt 2>&1; echo "exit $?" >> $R/check-xent.txt
tail -2 $R/check-xent.txt
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 2,24p $R/profile-dense.txt
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --iters 20 --warmup 5 --cuda-graph > $R/graph.txt 2>&1; grep -E "^4x1024 " $R/graph.txt
cd /tmp && tar czf $OUT/r.tgz r78
