#!/bin/bash
# Session 16, call 5: bench/step_compare.sh with LoRA alpha 32 on both sides (its new default,
# the dense-step issue's setting), OPT-1.3B 4 x 1024: our dense step direct and graph-replayed,
# the synthetic-25% MLP step, PyTorch + PEFT + SDPA in the same call (lexp 98dc578).
set -u
R=/tmp/r110; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 240 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
grep -o '"alpha": [0-9.]*' $R/step13/torch.json $R/step13/lexp.json
grep -E "median_step_ms|min_step_ms" $R/step13/torch.json
cd /tmp && tar czf $OUT/r.tgz r110
