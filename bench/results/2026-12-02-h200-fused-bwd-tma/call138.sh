#!/bin/bash
# Session 22, call 4: the fused flash backward for heads of 64 from 8192 tokens, one
# warpgroup of 64 keys (FLASH_64_MID, FLASH_64_LONG). OPT-1.3B LoRA r=4 q,v steps at 1 x 8192
# and 1 x 16384 against PEFT + SDPA, with the fused backward and with the two-kernel one
# (LEXP_DETERMINISTIC_ATTENTION=1), same call; attention alone against SDPA at 4096, 8192 and
# 16384 tokens.
set -u
R=/tmp/r138; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=16384 ALSO_LEXP="det=LEXP_DETERMINISTIC_ATTENTION=1" timeout 330 bench/step_compare.sh $R/step opt-1.3b 8192,16384 > /dev/null 2>&1
grep -E "^1x|exit" $R/step/log.txt | head -20
(cd /tmp && tar czf $OUT/r.tgz r138)
bench/attention_compare.sh $R/attn 4096,8192,16384 64,128 > /dev/null 2>&1
grep -E "^(4096|8192|16384) " $R/attn/log.txt | head -6
(cd /tmp && tar czf $OUT/r.tgz r138)
