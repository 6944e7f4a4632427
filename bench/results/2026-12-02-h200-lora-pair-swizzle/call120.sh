#!/bin/bash
# Session 19, call 2: the reduce's lanes follow the partial sums' rows (coalesced loads); the
# paired backward at 4, 8 and 16 token chunks (rows bwd-c4/c8/c16) to choose the chunk count;
# LoRA-branch kernels against the CPU reference; gpu_engine.
set -u
R=/tmp/r120; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 120 $BIN/lexp check --kernel lora_wgrad_pair > $R/check_branch.txt 2>&1; echo "exit $?" >> $R/check_branch.txt
grep -E "passed|FAIL|exit" $R/check_branch.txt | tail -4
for i in 1 2 3; do
  timeout 100 $BIN/lexp bench matmul --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  grep -A18 "LoRA fold" $R/lora$i.txt
  (cd /tmp && tar czf $OUT/r.tgz r120)
done
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
(cd /tmp && tar czf $OUT/r.tgz r120)
