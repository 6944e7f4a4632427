#!/bin/bash
# Session 20, call 4: the one-kernel fused LoRA forward (`lora_fwd`) may now run a 3-stage
# pipeline too (with TMA; the dense GEMMs' tile was 2-13% faster in 3 stages than in 4 after
# the vectorised epilogue, call 124). Its configurations against the CPU reference, then the
# fused LoRA forms against PEFT's cuBLAS sequence in two processes; the layout-conversion GPU
# test (tests/tests/convert_layout.rs).
set -u
R=/tmp/r127; mkdir -p $R
. bench/gpu_env.sh lexp convert_layout || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv > $R/nvidia-smi.txt 2>&1
LEXP_GPU_TESTS=1 timeout 60 $BIN/convert_layout --nocapture > $R/convert_layout.txt 2>&1; echo "exit $?" >> $R/convert_layout.txt
grep -E "exact|test result|panicked" $R/convert_layout.txt
timeout 120 $BIN/lexp check --kernel lora_fwd > $R/check-lora_fwd.txt 2>&1; echo "exit $?" >> $R/check-lora_fwd.txt; tail -2 $R/check-lora_fwd.txt
(cd /tmp && tar czf $OUT/r.tgz r127)
for i in 1 2; do
  timeout 100 $BIN/lexp bench matmul --no-check --only lora --json $R/lora$i.json > $R/lora$i.txt 2>&1; echo "exit $?" >> $R/lora$i.txt
  sed -n '/^LoRA  /,$p' $R/lora$i.txt | head -24
  (cd /tmp && tar czf $OUT/r.tgz r127)
done
find /tmp/lexp-cache ~/.cache/lexp -name "autotune*" 2>/dev/null -exec grep -h "lora_fwd" {} \; | tee $R/autotune-lora_fwd.txt
(cd /tmp && tar czf $OUT/r.tgz r127)
