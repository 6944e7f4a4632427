#!/bin/bash
# Session 16, call 7: the final engine tiles (dense dk/dv of heads of 64 in 4 stages; block-sparse
# dk/dv and dq in one warpgroup). gpu_engine and gpu_sparse_attention (correctness), then
# OPT-1.3B 4 x 1024 graph-replayed (dense and synthetic-25% MLP), and attention alone against
# SDPA, dense and block-sparse at 25% / 10%.
set -u
R=/tmp/r112; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine gpu_sparse_attention || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
export LEXP_GPU_TESTS=1
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
timeout 120 $BIN/gpu_sparse_attention --nocapture --test-threads 1 --skip timed > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
grep -E "test result|^exit|panicked" $R/gpu_sparse_attention.txt
unset LEXP_GPU_TESTS
for v in dense mlp25; do
  f=""; [ $v = mlp25 ] && f="--synthetic-mlp-density 0.25"
  timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --warmup 5 --iters 30 $f > $R/step-$v.txt 2>&1
  echo "$v: $(grep -E '^4x1024 ' $R/step-$v.txt | tail -1)"
done
DENSITIES=0.25,0.1 timeout 150 bench/attention_compare.sh $R/attn 4096,16384 64 > /dev/null 2>&1; tail -8 $R/attn/log.txt
cd /tmp && tar czf $OUT/r.tgz r112
