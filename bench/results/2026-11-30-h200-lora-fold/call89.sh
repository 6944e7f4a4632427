#!/bin/bash
# Session 14, call 5: the LoRA fold padded to K multiples of 64, the shared dA pass.
# The branch kernels' GPU checks (lora_fold among them), OPT-1.3B 4 x 1024 steps against PEFT +
# SDPA with the fold and without (LEXP_NO_LORA_FOLD=1), graph-replayed, the synthetic 25% MLP
# step, and a profile of the dense step.
set -u
R=/tmp/r89; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
timeout 60 $BIN/lexp check --kernel lora_fold > $R/check-branch.txt 2>&1; echo "exit $?" >> $R/check-branch.txt
tail -3 $R/check-branch.txt
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="nofold=LEXP_NO_LORA_FOLD=1;graph=--cuda-graph;nofoldg=LEXP_NO_LORA_FOLD=1 --cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 260 bench/step_compare.sh $R/step opt-1.3b 1024 > /dev/null 2>&1
grep -A9 "vs sdpa" $R/step/log.txt | tail -11
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 3,26p $R/profile-dense.txt
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --profile $R/profile-mlp25.json > $R/profile-mlp25.txt 2>&1; sed -n 3,30p $R/profile-mlp25.txt
cd /tmp && tar czf $OUT/r.tgz r89
