#!/usr/bin/env bash
# #34's 1,000-way task on one GPU lease, prepared: train the triples model at the full 28 px (class-small; our
# CPUs train it at about 100 images/s, so the CPU rows use class-tiny at 16 px), then the exhaustive pass on a
# 20-timestep grid over 300 test composites (20,000 NFE each), the coarse pass and every strategy replayed
# (benchmarks/many_classes.py --sections thousand). Run from the checkout root with .whl and .data carried
# (../shared/device/prepare.sh); results go to $OUT (default ./gpu-out).
#   bash tools/gpu_run_triples.sh           # on the GPU machine: about 5 minutes of training, then the pass
#   TINY=1 bash tools/gpu_run_triples.sh    # the same steps on the CPU, small, to check the script before a lease
# Returns many_classes_gpu.json (the "thousand" rows), triples.tar (the exported model, 3 MB) and log.txt.
set -u
. tools/gpu_env.sh
work=$(mktemp -d)
if [ "${TINY:-0}" = 1 ]; then
  train=(--architecture class-tiny --resolution 16 --batch-size 64 --max-minutes 0.1 --device cpu)
  images=4; grid=4; pass_minutes=3; batch=256
else
  train=(--batch-size 1024 --warmup-steps 200 --precision bf16 --max-minutes "${MINUTES:-5}" --device cuda)
  images=${IMAGES:-300}; grid=${GRID:-20}; pass_minutes=${PASS_MINUTES:-4}; batch=8192
fi
timeout "${TRAIN_SECONDS:-330}" $py -m diffusion_classifier train --data fashion-mnist --layout triples \
  --out "$work/triples" --checkpoint-minutes 1000 "${train[@]}" >> "$log" 2>&1
echo "train exit $?" >> "$log"
timeout "${PASS_SECONDS:-420}" $py -m benchmarks.many_classes --sections thousand --triples-model "$work/triples" \
  --thousand-images "$images" --thousand-grid "$grid" --minutes "$pass_minutes" --chunk 50 --batch-size "$batch" \
  --out many_classes_gpu >> "$log" 2>&1
echo "many_classes exit $?" >> "$log"
cp benchmarks/results/many_classes_gpu.json "$OUT"/ 2>/dev/null
tar -cf "$OUT/triples.tar" -C "$work" --exclude checkpoint.pt triples 2>/dev/null
tail -40 "$log"
