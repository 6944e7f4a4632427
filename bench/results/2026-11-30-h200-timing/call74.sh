#!/bin/bash
# Session 12, call 1: cubins assembled by ptxas against the driver's JIT (fresh, cached,
# cache disabled), on the MLP products and the dense 4 x 1024 step; the engine on cubins.
set -u
R=/tmp/r74; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
TP=$(python3 -c "import triton, os; print(os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas'))")
{ which ptxas; ptxas --version | tail -2; ls -la /usr/local/cuda/bin/ptxas; $TP --version | tail -1; nvidia-smi --query-gpu=driver_version,clocks.sm --format=csv; } > $R/env.txt 2>&1
cat $R/env.txt
mlp() {
  name=$1; shift
  timeout 100 env "$@" $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/$name.json > $R/$name.txt 2>&1
  echo "$name: $(grep -E '^device' $R/$name.txt | sed 's/.*kernels as //;s/).*//') | $(grep -E '^ 128' $R/$name.txt | awk '{print $2, $7, $13}' | tr '\n' ' ')"
}
mlp m1-cubin13 LEXP_CACHE=/tmp/c1
mlp m2-jit LEXP_PTXAS=off
mlp m3-jitcached LEXP_PTXAS=off
mlp m4-cubin13 LEXP_CACHE=/tmp/c1
mlp m5-nocache LEXP_PTXAS=off CUDA_CACHE_DISABLE=1
mlp m6-cubintriton LEXP_PTXAS=$TP LEXP_CACHE=/tmp/c2
mlp m7-jitcached LEXP_PTXAS=off
step() {
  name=$1; shift
  timeout 100 env "$@" $BIN/lexp bench step --model opt-1.3b --batch 4 --seq 1024 --iters 20 --warmup 5 --cuda-graph > $R/$name.txt 2>&1
  echo "$name: $(grep -E '^4x1024' $R/$name.txt | awk '{print $3, $4, $5}') $(grep -o 'on NVIDIA.*' $R/$name.txt)"
}
step s1-jit LEXP_PTXAS=off
step s2-jitcached LEXP_PTXAS=off
step s3-cubin13 LEXP_CACHE=/tmp/c1
step s4-nocache LEXP_PTXAS=off CUDA_CACHE_DISABLE=1
step s5-jitcached LEXP_PTXAS=off
step s6-cubin13 LEXP_CACHE=/tmp/c1
cd /tmp && tar czf $OUT/r.tgz r74
