#!/bin/bash
# Session 20, call 5: the later-process slowdown of directly launched kernels (calls 70-76, 118,
# 122-123, 126). Hypothesis: a process whose autotuning choices come from the cache times its
# kernels right after start-up, before the GPU's clock has ramped up (10 warm-up launches are
# a few ms), while a process that autotunes first has been busy for seconds. Test: the sparse
# MLP bench three times on one cache (1: tunes; 2: cached, 10 warm-up launches; 3: cached,
# 2000 warm-up launches), logging the SM clock every 20 ms throughout. (Binary: that of call 127,
# whose extra lora_fwd variants were not kept; the MLP kernels are those of 7d6d7df.)
set -u
R=/tmp/r128; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv > $R/nvidia-smi.txt 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 20 > $R/clocks.csv 2>&1 &
SMI=$!
for run in 1:10 2:10 3:2000; do
  i=${run%%:*}; w=${run##*:}
  echo "$(date +%T.%N) start $i warmup $w" >> $R/marks.txt
  timeout 120 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --warmup $w --json $R/mlp$i.json > $R/mlp$i.txt 2>&1; echo "exit $?" >> $R/mlp$i.txt
  echo "$(date +%T.%N) end $i" >> $R/marks.txt
  echo "== process $i (warm-up $w)"; grep -E "^dense|0\.250|0\.500|exit" $R/mlp$i.txt | head -8
  (cd /tmp && tar czf $OUT/r.tgz r128)
  sleep 5
done
kill $SMI
(cd /tmp && tar czf $OUT/r.tgz r128)
