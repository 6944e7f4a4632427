#!/bin/bash
# Session 14, call 6: the fold's down over the targets' slots only, empty slots zeroed once,
# lora_down with 16-row programs (now the first configuration, which the engine runs): every
# branch configuration timed on the engine's shape, OPT-1.3B 4 x 1024 against PEFT + SDPA
# (fold / no fold, graph-replayed), the synthetic 25% MLP step, a profile of the dense step.
set -u
R=/tmp/r90; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
timeout 60 $BIN/lexp check --kernel lora_fold > $R/check-branch.txt 2>&1; echo "exit $?" >> $R/check-branch.txt
tail -2 $R/check-branch.txt
timeout 60 $BIN/lexp bench matmul --only branch --no-check > $R/branch.txt 2>&1; grep -E "u = |du = " $R/branch.txt
ITERS=20 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;nofoldg=LEXP_NO_LORA_FOLD=1 --cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 230 bench/step_compare.sh $R/step opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step/log.txt | grep -v "^== torch"
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --profile $R/profile-dense.json > $R/profile-dense.txt 2>&1; sed -n 3,26p $R/profile-dense.txt
cd /tmp && tar czf $OUT/r.tgz r90
