#!/bin/bash
# Session 12, call 2: is the slow later-process MLP timing the host? Event-timed launches
# against graph replays, with the host's queuing time per launch.
set -u
R=/tmp/r75; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
mlp() {
  name=$1; shift
  timeout 120 env "$@" $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/$name.json > $R/$name.txt 2>&1
  echo "== $name"; sed -n '/BS/,$p' $R/$name.txt | grep -v "^wrote\|acceptance"
}
mlp a-cubin LEXP_CACHE=/tmp/c1
mlp b-cubincached LEXP_CACHE=/tmp/c1
mlp c-jit LEXP_PTXAS=off
mlp d-jitcached LEXP_PTXAS=off
cd /tmp && tar czf $OUT/r.tgz r75
