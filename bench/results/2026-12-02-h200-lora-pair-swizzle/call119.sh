#!/bin/bash
# Session 19, call 1: the LoRA fold's backward with both weight-gradient passes in one launch
# (lora_wgrad_pair) and the reduce writing the gradients (no zeroing launch), against the
# previous sequence (bwd-split) and PEFT in the same run, three processes; the new kernel and
# the writing reduce checked on the GPU against the CPU reference; gpu_engine (fold gradients
# against the CPU engine); attention at 16384 tokens against SDPA once more.
set -u
R=/tmp/r119; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 120 $BIN/lexp check --kernel lora_wgrad_pair > $R/check_branch.txt 2>&1; echo "exit $?" >> $R/check_branch.txt
tail -4 $R/check_branch.txt
for i in 1 2 3; do
  timeout 100 $BIN/lexp bench matmul --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  grep -A12 "LoRA fold" $R/lora$i.txt
  (cd /tmp && tar czf $OUT/r.tgz r119)
done
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
(cd /tmp && tar czf $OUT/r.tgz r119)
timeout 120 bench/attention_compare.sh $R/attn 16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
(cd /tmp && tar czf $OUT/r.tgz r119)
