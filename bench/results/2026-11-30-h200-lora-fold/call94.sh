#!/bin/bash
# Session 14, call 10: cuBLASLt algorithms timed on first use, the input-gradient GEMMs through
# cuBLASLt, the final LoRA fold: the branch kernels' GPU checks (the fixed reduce case), OPT-1.3B
# 4 x 1024 against PEFT + SDPA graph-replayed with and without the timing (LEXP_LT_AUTOTUNE=0)
# and without the fold, the synthetic 25% MLP step; OPT-2.7B 4 x 1024; a dense profile.
set -u
R=/tmp/r94; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 60 $BIN/lexp check --kernel lora_fold > $R/check-branch.txt 2>&1; echo "exit $?" >> $R/check-branch.txt
tail -2 $R/check-branch.txt; grep -E "^lora_(fold|wgrad_reduce_many) " $R/check-branch.txt | awk '{print $1, $NF}' | sort | uniq -c
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;notuneg=LEXP_LT_AUTOTUNE=0 --cuda-graph;nofoldg=LEXP_NO_LORA_FOLD=1 --cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 260 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph" timeout 150 bench/step_compare.sh $R/step27 opt-2.7b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step27/log.txt | grep -v "^== torch"
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 3,34p $R/profile-dense.txt
cd /tmp && tar czf $OUT/r.tgz r94
