#!/bin/bash
# Session 15, call 6: the LM head's logits in slices scored while in L2 (XENT_ROWS): OPT-1.3B
# 4 x 1024 graph-replayed steps with slices of 1024 (the old form), 512, 256, 128 rows, dense and
# synthetic-25% MLP, alternating; then a profile with the default (256).
set -u
R=/tmp/r101; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
for rep in 1 2; do
for rows in 1024 256 512 128; do
  for m in dense mlp25; do
    extra=""; [ $m = mlp25 ] && extra="--synthetic-mlp-density 0.25"
    LEXP_XENT_ROWS=$rows timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --iters 25 $extra > $R/step-$m-$rows-$rep.txt 2>&1
    echo "$m rows=$rows rep=$rep $(tail -1 $R/step-$m-$rows-$rep.txt | awk '{print $3, $7, $8}')"
  done
done
done
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; grep -E "xent|cublas gemm (1024|256)|^profile" $R/profile-dense.txt
cd /tmp && tar czf $OUT/r.tgz r101
