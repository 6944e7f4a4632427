#!/bin/bash
# Session 21, call 4: the fold's one-kernel forward chosen by the wave rule (its 128 x 256 tiles
# fit the multiprocessors; CudaDevice reads their count): gpu_engine, and the fused LoRA forms
# against PEFT in two more processes.
set -u
R=/tmp/r132; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_engine --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|exit|FAILED|panicked" $R/gpu_engine.txt | head -10
(cd /tmp && tar czf $OUT/r.tgz r132)
for i in 1 2; do
  timeout 100 $BIN/lexp bench matmul --no-check --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  sed -n '/^LoRA fold/,$p' $R/lora$i.txt | grep -E "forward|fwd-1k|backward  "
  (cd /tmp && tar czf $OUT/r.tgz r132)
done
