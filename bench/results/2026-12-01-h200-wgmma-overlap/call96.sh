#!/bin/bash
# Session 15, call 1: deferred wgmma waits (the flash backward's S and dP products in flight
# together, exp2 overlapping the second). Every flash configuration timed with the old
# (8121c0a) and the new kernels in the same call, then every configuration against the f64
# reference, then dense and block-sparse attention against SDPA with the new engine tiles.
set -u
R=/tmp/r96; mkdir -p $R
. bench/gpu_env.sh gpu_flash gpu_flash_old lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
for w in old new old new; do
  b=gpu_flash; [ $w = old ] && b=gpu_flash_old
  timeout 60 $BIN/$b configurations_timed --nocapture --test-threads 1 > $R/timed-$w-$RANDOM.txt 2>&1
done
for f in $R/timed-*.txt; do echo "== $f"; grep -E "^32x64 (4x1024|1x16384) (dkdv|dq|fwd)|^16x128 (4x1024|1x16384) (dkdv|dq|fwd)" $f | grep -E "TMA\", 1" | sed 's/("W", 8), //; s/("TMA", 1), //; s/("D", [0-9]*), //' | cut -c1-90; done 2>&1 | head -120
timeout 170 $BIN/gpu_flash --nocapture --test-threads 1 --skip configurations_timed > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
unset LEXP_GPU_TESTS
DENSITIES=0.25,0.1 timeout 150 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -14 $R/attn/log.txt
cd /tmp && tar czf $OUT/r.tgz r96
