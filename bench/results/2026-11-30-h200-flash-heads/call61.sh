#!/bin/bash
# Session 10, call 4: the final code on OPT-2.7B and attention alone against SDPA.
set -u
R=/tmp/r61; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
ITERS=15 WARMUP=3 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/opt27 opt-2.7b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/opt27/log.txt | tail -8
bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
WIDTH=2560 bench/attention_compare.sh $R/attn80 4096,16384 80 > /dev/null 2>&1; tail -4 $R/attn80/log.txt
cd /tmp && tar czf $OUT/r.tgz r61
