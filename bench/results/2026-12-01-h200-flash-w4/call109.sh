#!/bin/bash
# Session 16, call 4: the step with the one-warpgroup flash tiles (lexp 98dc578) against the
# same step with the tiles before (lexp 46a24b5), alternating in one call, graph-replayed,
# OPT-1.3B 4 x 1024, dense and with SYNTHETIC 25% MLP lists; then PEFT + SDPA in the same call
# against the new binary.
set -u
R=/tmp/r109; mkdir -p $R
. bench/gpu_env.sh lexp lexp_old || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for round in 1 2; do
  for b in lexp_old lexp; do
    timeout 60 $BIN/$b bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --warmup 5 --iters 30 > $R/$b-dense-$round.txt 2>&1
    timeout 60 $BIN/$b bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --warmup 5 --iters 30 --synthetic-mlp-density 0.25 > $R/$b-mlp25-$round.txt 2>&1
  done
done
for f in $R/lexp*-*.txt; do echo "$(basename $f): $(grep -E '^4x1024 ' $f | tail -1)"; done
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 220 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
cd /tmp && tar czf $OUT/r.tgz r109
