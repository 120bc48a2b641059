"""Run in a fresh interpreter by fashion_mnist.py: seconds for imports, model loading, and scoring one image.

    python benchmarks/coldstart_child.py MODEL IMAGE
"""

import sys
import time

t0 = time.perf_counter()
import diffusers  # noqa: E402, F401

import diffusion_classifier as dc  # noqa: E402

t1 = time.perf_counter()
denoiser = dc.load_denoiser(sys.argv[1])
t2 = time.perf_counter()
dc.DiffusionClassifier(denoiser, strategy=dc.Exhaustive(25)).classify([sys.argv[2]])
print(t1 - t0, t2 - t1, time.perf_counter() - t2)
