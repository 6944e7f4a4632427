#!/bin/bash
# Session 11, call 9: the MLP products twice in a row again, with SM clock, power and
# temperature logged every 200 ms (call 70's second run was 10-19% slower; why?).
set -u
R=/tmp/r71; mkdir -p $R
. bench/gpu_env.sh lexp || exit 2
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $R/clocks.csv 2>&1 &
SMI=$!
for i in 1 2; do
  date +%T.%N >> $R/marks.txt
  timeout 100 $BIN/lexp bench mlp --block 128 --density 0.25,0.5 --iters 40 --json $R/mlp$i.json > $R/mlp$i.txt 2>&1; echo "exit $?" >> $R/mlp$i.txt
  date +%T.%N >> $R/marks.txt
  tail -5 $R/mlp$i.txt | head -3
done
kill $SMI
awk -F', ' 'NR>1 {print $2, $4, $5, $6}' $R/clocks.csv | sort | uniq -c | sort -rn | head -12
cat $R/marks.txt
cd /tmp && tar czf $OUT/r.tgz r71
