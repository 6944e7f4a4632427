#!/bin/bash
# Session 15, call 2: where the synthetic-25% MLP step's time goes on the final code of
# session 14 (profile), and whether other sparse-MLP tiles win at the step's 4096 tokens
# (lexp bench mlp autotunes every configuration there).
set -u
R=/tmp/r97; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 150 $BIN/lexp bench mlp --tokens 4096 --block 128 --density 0.25,0.5 --json $R/mlp4096.json > $R/mlp4096.txt 2>&1; echo "exit $?" >> $R/mlp4096.txt
cat $R/mlp4096.txt | tail -8
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --profile $R/profile-mlp25.json > $R/profile-mlp25.txt 2>&1; sed -n 2,40p $R/profile-mlp25.txt
timeout 90 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --cuda-graph --iters 25 > $R/step-mlp25.txt 2>&1; tail -2 $R/step-mlp25.txt
cd /tmp && tar czf $OUT/r.tgz r97
