#!/bin/bash
# Session 21, call 2: lora_fwd with the expand's B tile loaded before the K loop and the bias
# right after it (their global latency no longer serial in the epilogue): every lora_fwd
# configuration against the CPU reference; the fused LoRA forms against PEFT's sequence in three
# processes. Dense attention against SDPA with the forward of heads of 64 at 16384 tokens in
# 3 stages (FLASH_64_LONG), twice.
set -u
R=/tmp/r130; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 150 $BIN/lexp check --kernel lora_fwd > $R/check.txt 2>&1; echo "exit $?" >> $R/check.txt
tail -3 $R/check.txt
(cd /tmp && tar czf $OUT/r.tgz r130)
for i in 1 2 3; do
  timeout 100 $BIN/lexp bench matmul --no-check --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  sed -n '/^LoRA  /,$p' $R/lora$i.txt | head -9
  (cd /tmp && tar czf $OUT/r.tgz r130)
done
for i in 1 2; do
  bench/attention_compare.sh $R/attn$i 4096,16384 64,128 > /dev/null 2>&1
  grep -E "^(4096|16384) " $R/attn$i/log.txt
  (cd /tmp && tar czf $OUT/r.tgz r130)
done
