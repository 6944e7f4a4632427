#!/bin/bash
# Session 17, call 3: the steps with the diagonal-only causal mask, fused multiply-adds and the
# retuned flash tiles, against PEFT + SDPA in the same call: OPT-1.3B 4 x 1024 (our dense
# graph-replayed step, the synthetic-25% MLP step) and 1 x 4096 / 8192 (dense, graph-replayed).
set -u
R=/tmp/r115; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 240 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
(cd /tmp && tar czf $OUT/r.tgz r115)
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" timeout 240 bench/step_compare.sh $R/long opt-1.3b 4096,8192 > /dev/null 2>&1
grep -E "^==|^1x(4096|8192)  " $R/long/log.txt | grep -v "^== torch"
cd /tmp && tar czf $OUT/r.tgz r115
