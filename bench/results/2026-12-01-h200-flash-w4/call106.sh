#!/bin/bash
# Session 16, call 1: one-warpgroup flash tiles (W = 4: 64-query forward and dq programs,
# 64-key dk/dv programs; 2-4 CTAs per SM). Every flash configuration timed twice, then every
# configuration against the f64 reference.
set -u
R=/tmp/r106; mkdir -p $R
. bench/gpu_env.sh gpu_flash || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
for i in 1 2; do
  timeout 100 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/timed-$i.txt 2>&1
done
for f in $R/timed-*.txt; do echo "== $f"; grep -E "^32x64 (4x1024|1x16384) (dkdv|dq|fwd)|^16x128 (4x1024|1x16384) (dkdv|dq|fwd)" $f | grep -E "TMA\", 1" | sed 's/("TMA", 1), //; s/("D", [0-9]*), //' | sort -t: -k1,1 -s | cut -c1-100; done 2>&1 | head -150
timeout 240 $BIN/gpu_flash --nocapture --test-threads 1 --skip configurations_timed > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
cd /tmp && tar czf $OUT/r.tgz r106
