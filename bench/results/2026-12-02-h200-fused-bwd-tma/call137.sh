#!/bin/bash
# Session 22, call 3: the engine with the fused flash backward for heads of 64 from 16384
# tokens (FLASH_64_LONG) against the two-kernel backward (LEXP_DETERMINISTIC_ATTENTION=1):
# OPT-1.3B LoRA r=4 q,v steps at 1 x 16384 against PEFT + SDPA in the same call, then every
# flash configuration (fused ones included) timed at one sequence of 8192 and 16384 tokens.
set -u
R=/tmp/r137; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=16384 ALSO_LEXP="det=LEXP_DETERMINISTIC_ATTENTION=1" timeout 280 bench/step_compare.sh $R/step opt-1.3b 16384 > /dev/null 2>&1
grep -hE "speedup|median|loss" $R/step/compare*.json | head -12; tail -4 $R/step/log.txt
(cd /tmp && tar czf $OUT/r.tgz r137)
LEXP_FLASH_TIMED_TOKENS=8192,16384 LEXP_GPU_TESTS=1 timeout 250 $BIN/gpu_flash --nocapture --test-threads 1 configurations_timed > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "32x64 1x8192 (dkdv|dq|fused)|fused" $R/gpu_flash-timed.txt | grep -E "W\", 4\), \(\"TMA\", 1\), \(\"C\", 3|fused|BM\", 128\), \(\"BN\", 128\), \(\"S\", 2" | head -20; tail -2 $R/gpu_flash-timed.txt
(cd /tmp && tar czf $OUT/r.tgz r137)
