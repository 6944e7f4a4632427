#!/bin/bash
# Session 21, call 3: the fold's forward in one lora_fwd launch up to 2048 tokens
# (runtime/src/gpu/fold_one_kernel.rs). gpu_engine (LoRA gradients of the fold against the CPU
# engine) with it and without it (LEXP_FOLD_ONE_KERNEL=0); the fused LoRA forms against PEFT
# (new row fwd-1k) in two processes; the OPT-1.3B 4 x 512 and 4 x 1024 steps against PEFT + SDPA,
# one-kernel forward on and off, direct and graph-replayed.
set -u
R=/tmp/r131; mkdir -p $R
. bench/gpu_env.sh lexp gpu_engine || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_engine --test-threads 1 > $R/gpu_engine.txt 2>&1; echo "exit $?" >> $R/gpu_engine.txt
LEXP_FOLD_ONE_KERNEL=0 LEXP_GPU_TESTS=1 timeout 200 $BIN/gpu_engine --test-threads 1 > $R/gpu_engine_off.txt 2>&1; echo "exit $?" >> $R/gpu_engine_off.txt
grep -E "test result|exit|FAILED|panicked" $R/gpu_engine.txt $R/gpu_engine_off.txt | head -20
(cd /tmp && tar czf $OUT/r.tgz r131)
for i in 1 2; do
  timeout 100 $BIN/lexp bench matmul --no-check --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  sed -n '/^LoRA fold/,$p' $R/lora$i.txt | grep -E "forward|fwd-1k|backward  "
  (cd /tmp && tar czf $OUT/r.tgz r131)
done
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="off=LEXP_FOLD_ONE_KERNEL=0;graph=--cuda-graph;offgraph=LEXP_FOLD_ONE_KERNEL=0 --cuda-graph" timeout 330 bench/step_compare.sh $R/step opt-1.3b 512,1024 > $R/step.txt 2>&1
tail -30 $R/step.txt
(cd /tmp && tar czf $OUT/r.tgz r131)
