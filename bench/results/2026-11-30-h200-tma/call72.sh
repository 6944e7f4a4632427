#!/bin/bash
# Session 11, call 10: is the slower second run of call 70/71 the autotune cache path? Three
# runs with a fresh autotune cache each (autotuning every time), then one reusing the cache.
set -u
R=/tmp/r72; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
for i in 1 2 3; do
  LEXP_CACHE=/tmp/cache-fresh-$i timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/fresh$i.json > $R/fresh$i.txt 2>&1
  echo "fresh $i: $(grep -E '^ 128' $R/fresh$i.txt | awk '{print $2, $13}' | tr '\n' ' ')"
done
LEXP_CACHE=/tmp/cache-fresh-3 timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/cached.json > $R/cached.txt 2>&1
echo "cached: $(grep -E '^ 128' $R/cached.txt | awk '{print $2, $13}' | tr '\n' ' ')"
cd /tmp && tar czf $OUT/r.tgz r72
