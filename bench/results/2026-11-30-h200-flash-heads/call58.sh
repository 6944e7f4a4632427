#!/bin/bash
# Session 10, call 1: flash attention on heads viewed [T, groups, hd] (no pad copies for
# OPT-2.7B's 80), lse2/delta loaded before the dk/dv MMAs.
set -u
R=/tmp/r58; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_sparse_attention gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > $R/nvidia-smi.txt
LEXP_GPU_TESTS=1 timeout 120 $BIN/gpu_flash flash_attention_matches --nocapture --test-threads 1 > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
LEXP_GPU_TESTS=1 timeout 60 $BIN/gpu_sparse_attention block_sparse_attention_matches --nocapture --test-threads 1 > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
LEXP_GPU_TESTS=1 timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -h "test result\|^exit\|panicked" $R/gpu_flash.txt $R/gpu_sparse_attention.txt $R/gpu_engine.txt
grep "heads of 80" $R/gpu_flash.txt | awk '{print $NF, $0}' | cut -c1-160 | tail -4
bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -6 $R/attn/log.txt
WIDTH=2560 bench/attention_compare.sh $R/attn80 4096,16384 80 > /dev/null 2>&1; tail -4 $R/attn80/log.txt
ITERS=15 WARMUP=3 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/opt27 opt-2.7b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/opt27/log.txt | tail -8
timeout 60 $BIN/lexp bench step --model opt-2.7b --batch 4 --seq 1024 --profile $R/opt27-profile.json > $R/opt27-profile.txt 2>&1; head -24 $R/opt27-profile.txt
cd /tmp && tar czf $OUT/r.tgz r58
