#!/usr/bin/env bash
# #24 (c) on one GPU lease: the generative-only pairs control (benchmarks/gpu_pairs.py). The packed caption
# states (28 MiB) and the wheels plus data (35 MiB) do not fit one call's 64 MiB next to the checkout, so the
# lease takes two calls in a row (the machine keeps ignored files while warm, 30 s after a call):
#   here, once:  .venv/bin/python benchmarks/gpu_pairs.py pack --states .states && bash ../shared/device/prepare.sh
#   call 1:      bash tools/gpu_run_pairs.sh stage          carry [".states"]           (seconds)
#   call 2:      bash tools/gpu_run_pairs.sh                carry [".whl", ".data"]     (about 9.5 minutes)
#   TINY=1 bash tools/gpu_run_pairs.sh                      the same on the CPU, small (packs its own states)
set -u
keep=/tmp/diffusion-classifier-states  # outside the checkout: survives the next call's copy of the tree
if [ "${1:-}" = stage ]; then
  [ -f .states/train-captions.npz ] || { echo "no .states here: carry [\".states\"]"; exit 2; }
  rm -rf "$keep" && cp -r .states "$keep" && ls -l "$keep" && echo "staged: now call 2, within 30 s"
  exit 0
fi
. tools/gpu_env.sh
states=.states; [ -f $states/train-captions.npz ] || states=$keep
if [ "${TINY:-0}" = 1 ]; then
  states=$OUT/states
  $py benchmarks/gpu_pairs.py pack --tiny --states "$states" >> "$log" 2>&1 || { tail -20 "$log"; exit 1; }
  tiny=--tiny
else
  tiny=
  [ -f $states/train-captions.npz ] || { echo "no staged states ($keep): run call 1 first"; exit 2; }
fi
work=$(mktemp -d)
timeout "${SECONDS_LIMIT:-570}" $py benchmarks/gpu_pairs.py run $tiny --states "$states" --out-dir "$work" \
  ${COMPILE:+--compile} --minutes "${MINUTES:-7}" --budget-seconds "${BUDGET_SECONDS:-540}" >> "$log" 2>&1
echo "gpu_pairs exit $?" >> "$log"
cp "$work"/gpu_pairs.json "$work"/*.tar "$OUT"/ 2>/dev/null
tail -30 "$log"
