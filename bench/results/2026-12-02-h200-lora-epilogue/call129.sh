#!/bin/bash
# Session 21, call 1: lora_down with 16-row programs again (autotuned per token bucket): every
# LoRA-branch configuration against the CPU reference; lora_down per configuration at 2048 and
# 4096 tokens (bench branch); the fused LoRA forms (one kernel, fold) against PEFT's sequence in
# three processes.
set -u
R=/tmp/r129; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 150 $BIN/lexp check --kernel lora_down > $R/check.txt 2>&1; echo "exit $?" >> $R/check.txt
tail -4 $R/check.txt
(cd /tmp && tar czf $OUT/r.tgz r129)
for i in 1 2 3; do
  timeout 120 $BIN/lexp bench matmul --no-check --only lora,branch --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  grep -E "2048 tokens|exit" $R/lora$i.txt | head -40
  sed -n '/^LoRA  /,$p' $R/lora$i.txt | head -24
  (cd /tmp && tar czf $OUT/r.tgz r129)
done
