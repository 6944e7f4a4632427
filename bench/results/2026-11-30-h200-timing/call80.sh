#!/bin/bash
# Session 12, call 7: the device smoke test with graph-replayed timing (time_graph_ms).
set -u
R=/tmp/r80; mkdir -p $R
. bench/gpu_env.sh gpu_device || exit 2
LEXP_GPU_TESTS=1 timeout 120 $BIN/gpu_device --nocapture --test-threads 1 > $R/gpu_device.txt 2>&1; echo "exit $?" >> $R/gpu_device.txt
grep -E "axpb|capture|test result|^exit|panicked" $R/gpu_device.txt
cd /tmp && tar czf $OUT/r.tgz r80
