#!/bin/bash
# Session 16, call 2: the engine on one-warpgroup flash tiles for short batches (FLASH_64 /
# FLASH_128 W = 4; FLASH_*_LONG from 4096 tokens). Every flash configuration timed (with
# one sequence of 4096 and 8192 at heads of 64 added), then gpu_engine (the engine against
# the CPU model, flash included).
set -u
R=/tmp/r107; mkdir -p $R
. bench/gpu_env.sh gpu_flash gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
timeout 150 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/timed.txt 2>&1; echo "exit $?" >> $R/timed.txt
grep -E "^32x64 1x(4096|8192) (dkdv|dq|fwd)" $R/timed.txt | grep -E "TMA\", 1" | sed 's/("TMA", 1), //; s/("D", [0-9]*), //' | sort -t: -k1,1 -s | cut -c1-100
tail -3 $R/timed.txt
timeout 300 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked|^test " $R/gpu_engine.txt
cd /tmp && tar czf $OUT/r.tgz r107
