# Sourced by the tools/gpu_run*.sh scripts on the GPU machine: the carried wheels (.whl) on PYTHONPATH, the
# carried Fashion-MNIST (.data) where data.py looks, $py, $OUT and $log. Harmless on a CPU machine.
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
log="$OUT/log.txt"
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD/src PYTHONUNBUFFERED=1
if [ -d .data/fashion-mnist ] && [ ! -e /usr/share/datasets/fashion-mnist ]; then
  mkdir -p /usr/share/datasets && ln -sfn "$PWD/.data/fashion-mnist" /usr/share/datasets/fashion-mnist
fi
py=python3; [ -x .venv/bin/python ] && py=.venv/bin/python
{ date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $py -c "import torch; print(torch.__version__)"; } >> "$log" 2>&1
