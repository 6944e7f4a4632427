#!/bin/bash
# Session 18, call 1: dk/dv of heads of 64 held to three programs per multiprocessor
# (`ctas = 3`: 168 registers, 48 bytes spilled) in FLASH_64 and FLASH_64_LONG. Attention alone
# against SDPA (heads of 64 and 128, 4096 and 16384 tokens), gpu_engine, every flash
# configuration against the f64 reference, then every configuration timed.
set -u
R=/tmp/r117; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 200 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -8 $R/attn/log.txt
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
(cd /tmp && tar czf $OUT/r.tgz r117)
timeout 240 $BIN/gpu_flash --nocapture --test-threads 1 --exact flash_attention_matches_the_reference_on_the_gpu > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
(cd /tmp && tar czf $OUT/r.tgz r117)
timeout 100 $BIN/gpu_flash --nocapture --test-threads 1 configurations_timed > $R/gpu_flash_timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash_timed.txt
grep -E "dkdv .*\"W\", 4\), \(\"TMA\", 1\)" $R/gpu_flash_timed.txt | grep '"D", 64' | head -20
(cd /tmp && tar czf $OUT/r.tgz r117)
