#!/usr/bin/env bash
# #34 on one GPU lease, prepared: what the CPUs here cannot afford, scored and stored; the strategies are replayed
# on the CPU afterwards (benchmarks/many_classes.py reads the stored runs and caches).
#   1. with PAIRS=1 only (the pass is stored here since session 18): the 90-way pass, the shipped pairs model on
#      500 composites, exhaustive on the 50-timestep grid (4,500 NFE each; about 2 CPU-hours here), float32, then
#      the 20 partial captions at 10 timesteps (the coarse cache). The 88 MB text encoder cannot travel: its
#      token states of the 110 captions do (--sections states, here).
#   2. with the time left: the 1,000-way triples model trained at the full 28 px (class-small, bf16; the CPU rows
#      use class-tiny at 16 px), then its exhaustive pass on a 20-timestep grid over up to 600 composites (in
#      passes of 300) and its coarse cache, bfloat16.
# Run from the checkout root with .whl and .data (../shared/device/prepare.sh) carried (and .states with PAIRS=1:
#   python -m benchmarks.many_classes --sections states --states .states/many_classes.npz, here, once):
#   bash tools/gpu_run_many_classes.sh          # the GPU machine; BUDGET seconds in all (default 480)
#   TINY=1 bash tools/gpu_run_many_classes.sh   # the same steps on the CPU, small, to check the script first
# Returns, in $OUT: stored.tar.xz split into 15 MiB parts (stored.tar.xz.part-aa, ...; the stored runs under
# benchmarks/runs/, the caches under benchmarks/results/, the trained model under train-runs/triples28) and
# log.txt. Here: cat stored.tar.xz.part-* | tar -xJ -C <checkout>.
set -u
. tools/gpu_env.sh
start=$(date +%s)
budget=${BUDGET:-480}
left() { echo $(( budget - ($(date +%s) - start) )); }
states=.states/many_classes.npz
if [ "${PAIRS:-0}" = 1 ] && [ ! -f "$states" ]; then
  echo "$states is missing: python -m benchmarks.many_classes --sections states --states $states"; exit 1
fi
if [ "${TINY:-0}" = 1 ]; then
  pairs=(--images 90 --chunk 2 --minutes 0.01 --batch-size 1024 --device cpu --dtype float32)
  train=(--architecture class-tiny --resolution 16 --batch-size 64 --max-minutes 0.1 --device cpu)
  thousand=(--thousand-images 4 --thousand-grid 4 --chunk 4 --batch-size 256 --device cpu)
  pass_share=120; train_seconds=60
else
  pairs=(--images 500 --chunk 100 --minutes 4 --batch-size 8192 --device cuda --dtype float32)
  train=(--batch-size 1024 --warmup-steps 200 --precision bf16 --max-minutes "${TRAIN_MINUTES:-2}" --device cuda)
  thousand=(--thousand-images 600 --thousand-grid 20 --chunk 50 --batch-size 8192 --device cuda --dtype bfloat16)
  pass_share=300; train_seconds=$(( ${TRAIN_MINUTES:-2} * 60 + 45 ))
fi
if [ "${PAIRS:-0}" = 1 ]; then
  echo "== 90-way pass" >> "$log"
  timeout "$pass_share" $py -m benchmarks.many_classes --sections pass --coarse --store-only --states "$states" \
    "${pairs[@]}" >> "$log" 2>&1
  echo "90-way exit $? after $(( $(date +%s) - start )) s" >> "$log"
fi
if [ "$(left)" -gt $(( train_seconds + 90 )) ]; then
  echo "== 1,000-way: train at 28 px" >> "$log"
  mkdir -p train-runs
  timeout "$train_seconds" $py -m diffusion_classifier train --data fashion-mnist --layout triples \
    --out train-runs/triples28 --checkpoint-minutes 1000 "${train[@]}" >> "$log" 2>&1
  echo "train exit $? after $(( $(date +%s) - start )) s" >> "$log"
  pass_seconds=$(( $(left) - 40 ))
  if [ -f train-runs/triples28/model_index.json ] && [ "$pass_seconds" -gt 60 ]; then
    # new chunks start until a minute before the end, which leaves the last chunk and the coarse cache their time
    timeout "$pass_seconds" $py -m benchmarks.many_classes --sections thousand --store-only \
      --triples-model train-runs/triples28 --minutes "$(awk "BEGIN {print ($pass_seconds - 60) / 60}")" \
      "${thousand[@]}" >> "$log" 2>&1
    echo "1,000-way exit $? after $(( $(date +%s) - start )) s" >> "$log"
  fi
else
  echo "1,000-way skipped: $(left) s left" >> "$log"
fi
rm -f train-runs/triples28/checkpoint.pt
stored=$(ls -d benchmarks/runs/many-classes-fashion-mnist-pairs-* benchmarks/runs/many-classes-triples28-* \
  benchmarks/results/many_classes_coarse.npz benchmarks/results/many_classes_triples_coarse_grid_*.npz train-runs/triples28 \
  2>/dev/null)
tar -c $stored | xz -T0 -3 > "$OUT/stored.tar.xz"
split -b 15M -d -a 2 "$OUT/stored.tar.xz" "$OUT/stored.tar.xz.part-" && rm "$OUT/stored.tar.xz"
ls -la "$OUT" >> "$log"
echo "done after $(( $(date +%s) - start )) s" >> "$log"
tail -30 "$log"
