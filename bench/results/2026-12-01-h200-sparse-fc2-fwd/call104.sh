#!/bin/bash
# Session 15, call 9: the same OPT-1.3B 4 x 1024 comparison as calls 99-100 a third time (the MLP
# issue's point 6 has no margin; PyTorch's step moves between processes): PEFT + SDPA, our
# dense graph-replayed step, the synthetic-25% MLP step.
set -u
R=/tmp/r104; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 240 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  |median_step" $R/step13/log.txt | grep -v "^== torch" | cut -c1-200
cd /tmp && tar czf $OUT/r.tgz r104
