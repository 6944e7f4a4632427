#!/bin/bash
# Session 10, call 2: the split kernels for heads of 80 (OPT-2.7B), correctness and speed.
set -u
R=/tmp/r59; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash gpu_sparse_attention gpu_engine || exit 2
export LEXP_GPU_TESTS=1
timeout 90 $BIN/gpu_flash heads_of_80 --nocapture --test-threads 1 > $R/gpu_flash-80.txt 2>&1; echo "exit $?" >> $R/gpu_flash-80.txt
timeout 90 $BIN/gpu_flash configurations_timed --nocapture --test-threads 1 > $R/gpu_flash-timed.txt 2>&1; echo "exit $?" >> $R/gpu_flash-timed.txt
timeout 60 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
timeout 70 $BIN/gpu_sparse_attention block_sparse_attention_matches --nocapture --test-threads 1 > $R/gpu_sparse_attention.txt 2>&1; echo "exit $?" >> $R/gpu_sparse_attention.txt
grep -h "test result\|^exit\|panicked" $R/gpu_flash-80.txt $R/gpu_flash-timed.txt $R/gpu_engine.txt $R/gpu_sparse_attention.txt
grep "rel_l2" $R/gpu_flash-80.txt | awk '{for(i=1;i<=NF;i++) if($i=="rel_l2") print $(i+1)}' | sort -g | tail -1
grep "32x80 4x1024" $R/gpu_flash-timed.txt | cut -c1-140
grep "heads of 80" $R/gpu_engine.txt | tail -2 | cut -c1-160
WIDTH=2560 bench/attention_compare.sh $R/attn80 4096,16384 80 > /dev/null 2>&1; tail -4 $R/attn80/log.txt
ITERS=15 WARMUP=3 ALSO_LEXP="graph=--cuda-graph" bench/step_compare.sh $R/opt27 opt-2.7b 512,1024 > /dev/null 2>&1
grep -A4 "vs sdpa" $R/opt27/log.txt | tail -8
timeout 50 $BIN/lexp bench step --model opt-2.7b --batch 4 --seq 1024 --profile $R/opt27-profile.json > $R/opt27-profile.txt 2>&1; sed -n 3,12p $R/opt27-profile.txt
cd /tmp && tar czf $OUT/r.tgz r59
