#!/bin/bash
# Session 15, call 7: programmatic dependent launch (every sm_90 kernel waits for its
# predecessor in its first instruction; launched with programmatic stream serialisation).
# OPT-1.3B 4 x 1024 graph-replayed and direct steps, dense and synthetic-25% MLP, with and
# without the launch attribute (LEXP_NO_PDL=1), alternating; losses must match; then the
# every-kernel GPU checks with it on.
set -u
R=/tmp/r102; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for rep in 1 2; do
for pdl in on off; do
  for m in dense mlp25; do
    extra=""; [ $m = mlp25 ] && extra="--synthetic-mlp-density 0.25"
    env=""; [ $pdl = off ] && env="LEXP_NO_PDL=1"
    env $env timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --iters 25 $extra > $R/step-$m-$pdl-$rep.txt 2>&1
    echo "$m pdl=$pdl rep=$rep graph $(tail -1 $R/step-$m-$pdl-$rep.txt | awk '{print $3, $7, $8}')"
  done
done
done
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --iters 20 > $R/step-direct-on.txt 2>&1; echo "direct on $(tail -1 $R/step-direct-on.txt | awk '{print $3, $8}')"
LEXP_NO_PDL=1 timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --iters 20 > $R/step-direct-off.txt 2>&1; echo "direct off $(tail -1 $R/step-direct-off.txt | awk '{print $3, $8}')"
timeout 200 $BIN/lexp check > $R/check-all.txt 2>&1; echo "exit $?" >> $R/check-all.txt; tail -3 $R/check-all.txt
cd /tmp && tar czf $OUT/r.tgz r102
