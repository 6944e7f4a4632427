#!/bin/bash
# Session 20, call 2: the vectorised, swizzled layout conversion (call 1) in the flash kernels and
# the whole step. Every dense flash configuration against the f64 reference (gpu_flash's
# correctness test, cut short by call 1's timeout); attention forward + backward against SDPA at
# 4096 and 16384 tokens, heads of 64 and 128; the OPT-1.3B LoRA step against PEFT + SDPA at
# 4 x 1024 (direct, graph-replayed, synthetic 25% MLP graph-replayed) and at 1 x 4096 / 8192.
set -u
R=/tmp/r125; mkdir -p $R
. bench/gpu_env.sh lexp gpu_flash || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_GPU_TESTS=1 timeout 230 $BIN/gpu_flash --nocapture --test-threads 1 --exact flash_attention_matches_the_reference_on_the_gpu > $R/gpu_flash.txt 2>&1; echo "exit $?" >> $R/gpu_flash.txt
grep -E "test result|^exit|panicked" $R/gpu_flash.txt
(cd /tmp && tar czf $OUT/r.tgz r125)
timeout 120 bench/attention_compare.sh $R/attn 4096,16384 64,128 > /dev/null 2>&1; tail -8 $R/attn/log.txt
(cd /tmp && tar czf $OUT/r.tgz r125)
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph;mlp25g=--synthetic-mlp-density 0.25 --cuda-graph" timeout 150 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
tail -6 $R/step13/log.txt
(cd /tmp && tar czf $OUT/r.tgz r125)
BATCH=1 ITERS=10 WARMUP=2 ATTNS=sdpa MAX_POSITIONS=8192 ALSO_LEXP="graph=--cuda-graph" timeout 100 bench/step_compare.sh $R/long opt-1.3b 4096,8192 > /dev/null 2>&1
tail -6 $R/long/log.txt
(cd /tmp && tar czf $OUT/r.tgz r125)
