#!/bin/bash
# Session 22, call 2: fused flash backward variants narrowed (heads of 64: 64 or 128 keys in 3
# stages; heads of 128: two warpgroups of 64 keys in 32-query steps); the engine runs the fused
# backward from 16384 tokens only (FLASH_64_LONG: 128 keys; FLASH_128_LONGEST). Fused
# configurations against the f64 reference; every configuration timed at 4096 and 16384 tokens;
# attention against SDPA with the fused backward and with LEXP_DETERMINISTIC_ATTENTION=1.
set -u
R=/tmp/r136; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_FLASH_ONLY_FUSED=1 LEXP_GPU_TESTS=1 timeout 150 $BIN/gpu_flash --nocapture --test-threads 1 flash_attention_matches_the_reference_on_the_gpu > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -c "fused" $R/gpu_flash.txt; grep -E "panicked|test result|exit" $R/gpu_flash.txt | head -5
(cd /tmp && tar czf $OUT/r.tgz r136)
LEXP_FLASH_TIMED_TOKENS=4096,16384 LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_flash --nocapture --test-threads 1 configurations_timed > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
grep -E "dkdv|dq |delta|fused" $R/gpu_flash-timed.txt | grep -v "S\", 2), (\"W\", 8), (\"TMA\", 0)" | head -60
(cd /tmp && tar czf $OUT/r.tgz r136)
bench/attention_compare.sh $R/attn-fused 4096,16384 64,128 > /dev/null 2>&1
grep -E "^(4096|16384) " $R/attn-fused/log.txt; tail -2 $R/attn-fused/log.txt
(cd /tmp && tar czf $OUT/r.tgz r136)
LEXP_DETERMINISTIC_ATTENTION=1 bench/attention_compare.sh $R/attn-det 4096,16384 64,128 > /dev/null 2>&1
grep -E "^(4096|16384) " $R/attn-det/log.txt
(cd /tmp && tar czf $OUT/r.tgz r136)
