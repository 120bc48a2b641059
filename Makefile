# Quick start: `make demo` and `make test` both work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0

.PHONY: venv data browser demo serve test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Take the CPU build of torch from local disk first when no torch is installed:
	# an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU) || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST (Debian's dataset-fashion-mnist) for evaluation, training and benchmarks.
data:
	@test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz || \
	  { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
	    || echo "Fashion-MNIST not installed (apt-get unavailable, or it failed: another apt process may hold its lock); tests that need it will skip"; }

# Debian's chromium for the browser test of the web page (skipped with its reason where it is missing).
browser:
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium not installed (apt-get unavailable, or it failed: another apt process may hold its lock); the browser test will skip"; }

demo: venv
	$(VENV)/bin/diffusion-classifier classify examples/fashion-mnist/*.png --model fashion-mnist-text \
	  --preset fashion-mnist --timesteps 25 --top-k 3

serve: venv
	$(VENV)/bin/diffusion-classifier serve --model fashion-mnist-text

test: venv data browser
	$(PY) -m pytest -q -n 2  # two workers: each test runs torch on one thread (tests/conftest.py)

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
