#!/bin/bash
# Session 11, call 3: TMA loops with MMAs in flight refill at the end of an iteration, S-1
# tiles ahead (call 64's code refilled at the top, S-2 ahead). GEMMs (checked and timed), MLP.
set -u
R=/tmp/r65; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
timeout 200 $BIN/lexp check --kernel matmul --json $R/check-matmul.json > $R/check-matmul.txt 2>&1; echo "exit $?" >> $R/check-matmul.txt
tail -2 $R/check-matmul.txt
timeout 200 $BIN/lexp bench matmul --only gemm,sparse,lora --no-check --iters 30 --json $R/matmul.json > $R/matmul.txt 2>&1; echo "exit $?" >> $R/matmul.txt
for l in gemm_nn gemm_nt gemm_tn; do for s in 4096x4096x4096 16384x8192x2048; do echo "$l $s: $(grep "^$l *$s" $R/matmul.txt | grep "TMA=0" | sort -k4 -n | head -1 | awk '{print $4, $7}') | TMA: $(grep "^$l *$s" $R/matmul.txt | grep "TMA=1" | sort -k4 -n | head -1 | awk '{print $3, $4, $7}')"; done; done
grep -A40 "^mode" $R/matmul.txt | head -40
timeout 150 $BIN/lexp bench mlp --iters 40 --json $R/mlp.json > $R/mlp.txt 2>&1; echo "exit $?" >> $R/mlp.txt
tail -16 $R/mlp.txt
cd /tmp && tar czf $OUT/r.tgz r65
