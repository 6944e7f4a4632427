#!/bin/bash
# Session 11, call 2: every tensor-core kernel (TMA variants of the sparse and LoRA kernels
# included) against the CPU reference; then sparse GEMM, fused LoRA and the four MLP products.
set -u
R=/tmp/r64; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version --format=csv > $R/gpu.txt
timeout 200 $BIN/lexp check --kernel matmul --json $R/check-matmul.json > $R/check-matmul.txt 2>&1; echo "exit $?" >> $R/check-matmul.txt
tail -3 $R/check-matmul.txt
grep -v " ok$" $R/check-matmul.txt | grep -v "^kernel\|^device\|^Device" | head -20
timeout 200 $BIN/lexp bench matmul --only sparse,lora --no-check --iters 30 --json $R/matmul.json > $R/matmul.txt 2>&1; echo "exit $?" >> $R/matmul.txt
grep -A40 "^mode" $R/matmul.txt | head -60
timeout 150 $BIN/lexp bench mlp --iters 40 --json $R/mlp.json > $R/mlp.txt 2>&1; echo "exit $?" >> $R/mlp.txt
tail -30 $R/mlp.txt
cd /tmp && tar czf $OUT/r.tgz r64
