#!/bin/bash
# Session 16, call 3: the engine on one-warpgroup flash tiles. OPT-1.3B 4 x 1024 against
# PEFT + SDPA in one run (our dense graph-replayed step, the synthetic-25% MLP step), a
# profile of the latter, 1 x 4096 / 8192 against PEFT + SDPA, and attention alone against SDPA.
set -u
R=$OUT/r108; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 200 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
grep -E "^==|^4x1024  " $R/step13/log.txt | grep -v "^== torch"
timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --synthetic-mlp-density 0.25 --profile $R/profile-mlp25.json > $R/profile-mlp25.txt 2>&1; sed -n 3,16p $R/profile-mlp25.txt
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" timeout 170 bench/step_compare.sh $R/long opt-1.3b 4096,8192 > /dev/null 2>&1
grep -E "^==|^1x(4096|8192)  " $R/long/log.txt | grep -v "^== torch"
DENSITIES=0.25,0.1 timeout 120 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -14 $R/attn/log.txt
