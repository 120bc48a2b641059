#!/usr/bin/env bash
# One GPU lease, prepared: the scoring-throughput benchmark (#23), then equal-GPU-minutes training and scoring
# on all 10,000 Fashion-MNIST test images (#24). Run from the checkout root on the GPU machine with .whl and
# .data carried (../shared/device/prepare.sh puts them there); results go to $OUT (default ./gpu-out).
#   bash tools/gpu_run.sh            # on the GPU machine: about 9.5 minutes
#   TINY=1 bash tools/gpu_run.sh     # the same steps on the CPU, small, to check the script before a lease
set -u
. tools/gpu_env.sh
if [ "${TINY:-0}" = 1 ]; then
  tiny=--tiny; t1=120; t2=200; minutes=0.05; cnn=0.05
else
  tiny=; t1=${THROUGHPUT_SECONDS:-215}; t2=${TRAINING_SECONDS:-345}; minutes=${MINUTES:-2.9}; cnn=${CNN_MINUTES:-0.33}
fi
timeout "$t1" $py -m benchmarks.gpu_throughput $tiny --images 2 --budget-seconds $((t1 - 25)) \
  --out "$OUT/gpu_throughput.json" >> "$log" 2>&1
echo "gpu_throughput exit $?" >> "$log"
work=$(mktemp -d)
curve=; [ -z "$tiny" ] && curve="--curve-minutes ${CURVE_MINUTES:-0.7 1.4}"
timeout "$t2" $py -m benchmarks.gpu_training $tiny --minutes "$minutes" --cnn-minutes "$cnn" $curve \
  --budget-seconds $((t2 - 25)) --out-dir "$work" >> "$log" 2>&1
echo "gpu_training exit $?" >> "$log"
cp "$work"/gpu_training.json "$work"/*.tar "$OUT"/ 2>/dev/null
tail -40 "$log"
