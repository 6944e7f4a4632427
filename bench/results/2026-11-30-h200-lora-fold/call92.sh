#!/bin/bash
# Session 14, call 8: the final fold (one reduce launch per layer, lora_fold's programs apart,
# lora_down's fastest tile first): the branch kernels' GPU checks; OPT-1.3B 4 x 512 and 4 x 1024
# against PEFT + SDPA and + eager (fold direct and graph-replayed, no fold graph-replayed, the
# synthetic 25% MLP step); OPT-2.7B 4 x 1024; a profile of the dense 4 x 1024 step.
set -u
R=/tmp/r92; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 60 $BIN/lexp check --kernel lora_fold > $R/check-branch.txt 2>&1; echo "exit $?" >> $R/check-branch.txt
tail -2 $R/check-branch.txt; grep -c "reduce_many.* ok$" $R/check-branch.txt
ITERS=25 WARMUP=5 ATTNS=sdpa,eager ALSO_LEXP="graph=--cuda-graph;nofoldg=LEXP_NO_LORA_FOLD=1 --cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 330 bench/step_compare.sh $R/step13 opt-1.3b 512,1024 > /dev/null 2>&1
grep -E "^==|^4x(512|1024)  " $R/step13/log.txt | grep -v "^== torch"
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph" timeout 150 bench/step_compare.sh $R/step27 opt-2.7b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step27/log.txt | grep -v "^== torch"
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 3,24p $R/profile-dense.txt
cd /tmp && tar czf $OUT/r.tgz r92
