#!/bin/bash
# Session 20, call 1: the layout conversion through shared memory (every GEMM-like kernel's
# epilogue: accumulator -> store layout) now moves vectors through a swizzled scratch instead of
# one element at a time through a row-major one. Every kernel against the CPU reference, the
# flash / sparse-attention / engine GPU tests, then the tensor-core benchmarks (dense GEMM,
# block-sparse GEMMs, fused LoRA) against cuBLAS / PEFT's sequence in the same process: new
# binary, the previous binary (same commit without the change), new again; each binary its own
# autotuning cache. Then the sparse MLP's four products.
set -u
R=/tmp/r124; mkdir -p $R
. bench/gpu_env.sh lexp lexp_old gpu_flash gpu_engine gpu_sparse_attention || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
timeout 200 $BIN/lexp check > $R/check-all.txt 2>&1; echo "exit $?" >> $R/check-all.txt; tail -2 $R/check-all.txt
export LEXP_GPU_TESTS=1
for t in gpu_flash gpu_sparse_attention; do
  timeout 120 $BIN/$t --nocapture --test-threads 1 --skip timed > $R/$t.txt 2>&1; echo "exit $?" >> $R/$t.txt
  echo "$t: $(grep -E 'test result|panicked' $R/$t.txt | tail -1)"
done
timeout 120 $BIN/gpu_engine --nocapture --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
echo "gpu_engine: $(grep -E 'test result|panicked' $R/gpu_engine.txt | tail -1)"
unset LEXP_GPU_TESTS
(cd /tmp && tar czf $OUT/r.tgz r124)
for run in new old new2; do
  b=lexp; [ $run = old ] && b=lexp_old
  LEXP_CACHE=/tmp/cache-$b timeout 150 $BIN/$b bench matmul --no-check --json $R/matmul-$run.json > $R/matmul-$run.txt 2>&1; echo "exit $?" >> $R/matmul-$run.txt
  echo "== $run"; grep -E "^gemm|^sparse_out +128 +0\.[25]|^sparse_out +128 +1|^exit" $R/matmul-$run.txt | head -20
  (cd /tmp && tar czf $OUT/r.tgz r124)
done
timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5,1.0 --json $R/mlp.json > $R/mlp.txt 2>&1; echo "exit $?" >> $R/mlp.txt
grep -E "0\.250|0\.500|exit" $R/mlp.txt | head -8
(cd /tmp && tar czf $OUT/r.tgz r124)
