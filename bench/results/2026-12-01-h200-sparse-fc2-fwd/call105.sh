#!/bin/bash
# Session 15, call 10 (the shared PEFT-baseline helper, after a refactor): the LoRA fold as a fused LoRA layer (rank 16, 2048 x 2048, 2048 / 4096 /
# 16384 tokens) against PEFT's cuBLAS sequence in the same run, next to the one-kernel fused
# LoRA (lexp bench matmul --only lora).
set -u
R=/tmp/r105; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 300 $BIN/lexp bench matmul --only lora --no-check --json $R/lora.json > $R/lora.txt 2>&1; echo "exit $?" >> $R/lora.txt
grep -v "^lora_" $R/lora.txt | tail -22
cd /tmp && tar czf $OUT/r.tgz r105
