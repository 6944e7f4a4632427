#!/bin/bash
# Session 19, call 3: the LoRA fold's backward in the engine's order (du, the paired passes and
# the writing reduce, then the GEMM), against the same launches with the GEMM first
# (bwd-gemm1), the previous sequence (bwd-prev) and PEFT in the same run, three processes;
# then the OPT-1.3B 4 x 1024 step against PEFT + SDPA (the engine's fold now pairs its passes).
set -u
R=/tmp/r121; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
for i in 1 2 3; do
  timeout 100 $BIN/lexp bench matmul --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  grep -A12 "LoRA fold" $R/lora$i.txt
  (cd /tmp && tar czf $OUT/r.tgz r121)
done
ITERS=25 WARMUP=5 ATTNS=sdpa ALSO_LEXP="graph=--cuda-graph" timeout 240 bench/step_compare.sh $R/step13 opt-1.3b 1024 > /dev/null 2>&1
tail -12 $R/step13/log.txt
(cd /tmp && tar czf $OUT/r.tgz r121)
