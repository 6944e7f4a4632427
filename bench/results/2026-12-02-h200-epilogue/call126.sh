#!/bin/bash
# Session 20, call 3: with the vectorised layout conversion (calls 124-125): the sparse MLP's four
# products against cuBLAS in two more processes (direct and graph-replayed; blocks of 128 and
# 64); every flash configuration timed (gpu_flash configurations_timed: dk/dv of heads of 64 at
# three programs per multiprocessor, C = 3, against C = 1 after the epilogue change); the fused
# LoRA forms against PEFT's sequence once more.
set -u
R=/tmp/r126; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for i in 1 2; do
  timeout 100 $BIN/lexp bench mlp --block 128,64 --density 0.25,0.5,1.0 --json $R/mlp$i.json > $R/mlp$i.txt 2>&1; echo "exit $?" >> $R/mlp$i.txt
  grep -E "0\.250|0\.500|exit" $R/mlp$i.txt | head -12
  (cd /tmp && tar czf $OUT/r.tgz r126)
done
LEXP_GPU_TESTS=1 timeout 150 $BIN/gpu_flash --nocapture --test-threads 1 configurations_timed > $R/gpu_flash_timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash_timed.txt
grep -E "dkdv .*\"W\", 4\), \(\"TMA\", 1\)" $R/gpu_flash_timed.txt | grep '"D", 64' | head -20
tail -3 $R/gpu_flash_timed.txt
(cd /tmp && tar czf $OUT/r.tgz r126)
timeout 100 $BIN/lexp bench matmul --no-check --only lora --json $R/lora.json > $R/lora.txt 2>&1; echo "exit $?" >> $R/lora.txt
sed -n '/^LoRA  /,$p' $R/lora.txt | head -24
(cd /tmp && tar czf $OUT/r.tgz r126)
