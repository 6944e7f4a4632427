#!/bin/bash
# Session 21, call 5: refresh of the attention issue's sparse and long-context figures (last
# measured in call 69 / 114, before the flash epilogue and tile changes): the block-sparse
# kernels on synthetic masks at 25% / 10% against SDPA dense at 16384 tokens (heads of 64), and
# the OPT-1.3B long-context step (1 x 8192, 1 x 16384; LoRA r=4 q,v) dense and with synthetic
# 25% / 10% attention masks against PEFT + SDPA in the same call.
set -u
R=/tmp/r133; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
DENSITIES=0.25,0.1 bench/attention_compare.sh $R/attn 16384 64 > /dev/null 2>&1
grep -E "^16384|synthetic" $R/attn/log.txt
(cd /tmp && tar czf $OUT/r.tgz r133)
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=16384 ALSO_LEXP="a25=--synthetic-attn-density 0.25;a10=--synthetic-attn-density 0.1" timeout 420 bench/step_compare.sh $R/long opt-1.3b 8192,16384 > $R/long.txt 2>&1
grep -B2 -A4 "vs sdpa" $R/long/log.txt | tail -24
(cd /tmp && tar czf $OUT/r.tgz r133)
