#!/bin/bash
# Session 11, call 11: is the driver's JIT cache behind the slower later runs? Alternate runs
# with and without CUDA_CACHE_DISABLE=1 on one machine.
set -u
R=/tmp/r73; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
run() {
  timeout 100 env "$2" $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/$1.json > $R/$1.txt 2>&1
  echo "$1 ($2): $(grep -E '^ 128' $R/$1.txt | awk '{print $2, $7, $13}' | tr '\n' ' ')"
}
run a-default X=1
run b-nocache CUDA_CACHE_DISABLE=1
run c-default X=1
run d-nocache CUDA_CACHE_DISABLE=1
cd /tmp && tar czf $OUT/r.tgz r73
