#!/bin/bash
# Session 15, call 4: sparse_fc2_fwd on the GPU against the CPU reference (every sparse-MLP
# kernel configuration), then OPT-1.3B 4 x 1024 against PEFT + SDPA in one run: our dense
# graph-replayed step and the synthetic-25% MLP step; a profile of the latter.
set -u
R=/tmp/r99; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 120 $BIN/lexp check --kernel sparse_fc2_fwd > $R/check-mlp.txt 2>&1; echo "exit $?" >> $R/check-mlp.txt
tail -2 $R/check-mlp.txt; grep -E "^sparse_" $R/check-mlp.txt | awk '{print $1, $NF}' | sort | uniq -c
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 240 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --profile $R/profile-mlp25.json > $R/profile-mlp25.txt 2>&1; sed -n 3,26p $R/profile-mlp25.txt
cd /tmp && tar czf $OUT/r.tgz r99
