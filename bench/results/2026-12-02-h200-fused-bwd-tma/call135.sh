#!/bin/bash
# Session 22, call 1: the fused flash backward (dq added by TMA bulk reductions,
# cp.reduce.async.bulk.tensor). Correctness: gpu_flash (every dense configuration and every
# fused one against the f64 reference), gpu_engine (LoRA gradients vs the CPU engine, fused
# backward on). Speed: dense attention against SDPA with the fused backward, then with
# LEXP_DETERMINISTIC_ATTENTION=1 (the two-kernel backward), same call.
set -u
R=/tmp/r135; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_flash --nocapture --test-threads 1 flash_attention_matches_the_reference_on_the_gpu > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "fused" $R/gpu_flash.txt | head -3; grep -E "panicked|test result|exit" $R/gpu_flash.txt | head -5
(cd /tmp && tar czf $OUT/r.tgz r135)
bench/attention_compare.sh $R/attn-fused 4096,16384 64,128 > /dev/null 2>&1
grep -E "^(4096|16384) " $R/attn-fused/log.txt; tail -3 $R/attn-fused/log.txt
(cd /tmp && tar czf $OUT/r.tgz r135)
LEXP_DETERMINISTIC_ATTENTION=1 bench/attention_compare.sh $R/attn-det 4096,16384 64,128 > /dev/null 2>&1
grep -E "^(4096|16384) " $R/attn-det/log.txt
(cd /tmp && tar czf $OUT/r.tgz r135)
LEXP_GPU_TESTS=1 timeout 150 $BIN/gpu_engine --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "panicked|test result|exit" $R/gpu_engine.txt | head -5
(cd /tmp && tar czf $OUT/r.tgz r135)
