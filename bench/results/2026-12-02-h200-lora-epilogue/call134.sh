#!/bin/bash
# Session 21, call 6: lora_down with 256-wide K steps in 4 stages, now its first (the engine's)
# configuration: every LoRA-branch configuration against the CPU reference; lora_down per
# configuration at 4096 (rank 4) and 2048 (rank 16) tokens; the fused LoRA forms against PEFT in
# two processes (the fold's forward and backward run lora_down's first configuration).
set -u
R=/tmp/r134; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 150 $BIN/lexp check --kernel lora_down > $R/check.txt 2>&1; echo "exit $?" >> $R/check.txt
tail -2 $R/check.txt
(cd /tmp && tar czf $OUT/r.tgz r134)
for i in 1 2; do
  timeout 120 $BIN/lexp bench matmul --no-check --only lora,branch --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  grep -E "^u = x" $R/lora$i.txt | grep -E "BK=256|BM=32,BK=128,R=16,S=8" 
  sed -n '/^LoRA fold/,$p' $R/lora$i.txt | grep -E "^(forward|fwd-1k|backward) "
  (cd /tmp && tar czf $OUT/r.tgz r134)
done
