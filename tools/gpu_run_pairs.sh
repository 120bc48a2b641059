#!/usr/bin/env bash
# #24 (c) on one GPU lease: the generative-only pairs control (benchmarks/gpu_pairs.py). The packed caption
# states (31 MiB) and the wheels plus data (36 MiB) do not fit one call's 64 MiB next to the 24 MiB checkout,
# so the lease takes two calls in a row (the machine keeps files outside the checkout while warm, 30 s):
#   here, once:  .venv/bin/python -m benchmarks.gpu_pairs pack --states .states && bash ../shared/device/prepare.sh
#   call 1:      bash tools/gpu_run_pairs.sh stage          carry [".states"]           (seconds)
#   call 2:      bash tools/gpu_run_pairs.sh                carry [".whl", ".data"]     (about 9.5 minutes)
# Call 2 returns gpu_pairs.json, pairs-control.tar and the checkpoint in parts (checkpoint.pt.part-aa, -ab).
# To continue that run in a later lease, put the parts into .pairs-checkpoint/ here (ignored) and add, between
# the two calls:  bash tools/gpu_run_pairs.sh stage         carry [".pairs-checkpoint"]
#   TINY=1 bash tools/gpu_run_pairs.sh                      the same on the CPU, small (packs its own states)
set -u
keep=/tmp/diffusion-classifier-staged  # outside the checkout: survives the next call's copy of the tree
if [ "${1:-}" = stage ]; then
  mkdir -p "$keep"
  if [ -f .states/train-captions.npz ]; then rm -rf "$keep/states" && cp -r .states "$keep/states"; fi
  if ls .pairs-checkpoint/checkpoint.pt.part-* >/dev/null 2>&1; then
    cat .pairs-checkpoint/checkpoint.pt.part-* > "$keep/checkpoint.pt"
  fi
  ls -lR "$keep"; echo "staged: now the next call, within 30 s"
  exit 0
fi
. tools/gpu_env.sh
states=.states; [ -f $states/train-captions.npz ] || states=$keep/states
resume=; [ -f "$keep/checkpoint.pt" ] && resume="--resume-from $keep/checkpoint.pt"
if [ "${TINY:-0}" = 1 ]; then
  states=$OUT/states
  $py -m benchmarks.gpu_pairs pack --tiny --states "$states" >> "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  tiny=--tiny
else
  tiny=
  [ -f $states/train-captions.npz ] || { echo "no staged states ($keep/states): run the stage call first"; exit 2; }
fi
work=$(mktemp -d)
timeout "${SECONDS_LIMIT:-570}" $py -m benchmarks.gpu_pairs run $tiny --states "$states" --out-dir "$work" $resume \
  ${COMPILE:+--compile} --minutes "${MINUTES:-7}" --budget-seconds "${BUDGET_SECONDS:-540}" >> "$log" 2>&1
echo "gpu_pairs exit $?" >> "$log"
cp "$work"/gpu_pairs.json "$work"/*.tar "$OUT"/ 2>/dev/null
[ -f "$work/work/pairs-control/checkpoint.pt" ] && split -b 15m -a 2 "$work/work/pairs-control/checkpoint.pt" \
  "$OUT/checkpoint.pt.part-"
tail -30 "$log"
