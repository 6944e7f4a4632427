#!/bin/bash
# Session 17, call 1: flash attention with the causal mask on the diagonal blocks only and
# c·s − c·m as one FMA (the compiler now marks float add/sub/mul contractible, every kernel).
# Every kernel against the CPU reference (`lexp check`), every flash configuration against the
# f64 reference and timed, the block-sparse check, gpu_engine; OPT-1.3B 4 x 1024 graph-replayed
# (dense and synthetic-25% MLP); attention alone against SDPA (heads of 64 and 128, dense and
# block-sparse at 25% / 10%).
set -u
R=/tmp/r113; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_engine gpu_sparse_attention || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 200 $BIN/lexp check > $R/check-all.txt 2>&1; echo "exit $?" >> $R/check-all.txt; tail -3 $R/check-all.txt
export LEXP_GPU_TESTS=1
timeout 100 $BIN/gpu_flash --nocapture --test-threads 1 --skip timed > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
timeout 120 $BIN/gpu_sparse_attention --nocapture --test-threads 1 --skip timed > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
grep -E "test result|^exit|panicked" $R/gpu_sparse_attention.txt
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
grep -E "test result|^exit|panicked" $R/gpu_engine.txt
unset LEXP_GPU_TESTS
for v in dense mlp25; do
  f=""; [ $v = mlp25 ] && f="--synthetic-mlp-density 0.25"
  timeout 60 $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --cuda-graph --warmup 5 --iters 30 $f > $R/step-$v.txt 2>&1
  echo "$v: $(grep -E '^4x1024 ' $R/step-$v.txt | tail -1)"
done
DENSITIES=0.25,0.1 timeout 200 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -12 $R/attn/log.txt
(cd /tmp && tar czf $OUT/r.tgz r113)
LEXP_GPU_TESTS=1 timeout 100 $BIN/gpu_flash --nocapture --test-threads 1 configurations_timed > $R/gpu_flash_timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash_timed.txt
tail -5 $R/gpu_flash_timed.txt
cd /tmp && tar czf $OUT/r.tgz r113
