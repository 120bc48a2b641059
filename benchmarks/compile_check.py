"""Does every model family compile? `--compile` on a tiny random-weight pipeline of each family (the test
suite's builders, tiny_pipelines.py), against eager scoring of the same image.

    python -m benchmarks.compile_check            # about 2 minutes on 2 CPU cores

Prints and writes benchmarks/results/compile_check.json: per family whether the network stayed compiled
(no fallback), the compile time, and the largest relative difference of an error from eager.
"""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import DiffusionClassifier, Exhaustive, load_denoiser
from diffusion_classifier.runtime import atomic_write_text

from . import tiny_pipelines
from .common import RESULTS

FAMILIES = {
    "stable diffusion": (tiny_pipelines.build_stable_diffusion, "RGB"),
    "sdxl": (tiny_pipelines.build_sdxl, "RGB"),
    "sd3": (tiny_pipelines.build_sd3, "RGB"),
    "flux": (tiny_pipelines.build_flux, "RGB"),
    "dit": (lambda d: tiny_pipelines.build_dit(d, tiny_pipelines.CLASSES), "RGB"),
    "pixel class unet (ours)": (lambda d: tiny_pipelines.build_pixel_class(d, tiny_pipelines.CLASSES), "L"),
    "pixel text unet (ours)": (tiny_pipelines.build_pixel_text, "L"),
}


def main() -> None:
    root = Path(tempfile.mkdtemp())
    rows = []
    for name, (build, mode) in FAMILIES.items():
        directory = build(root / name.replace(" ", "-"))
        denoiser = load_denoiser(directory)
        labels = ["a cat", "a dog"] if denoiser.conditioning == "text" else None
        image = tiny_pipelines.random_images(1, size=denoiser.image_size[0], mode=mode)
        eager = DiffusionClassifier(denoiser, labels=labels, strategy=Exhaustive(3), batch_size=8).classify(image)[0]
        compiled = load_denoiser(directory)
        clf = DiffusionClassifier(compiled, labels=labels, strategy=Exhaustive(3), batch_size=8, compile=True)
        started = time.perf_counter()
        result = clf.classify(image)[0]
        rows.append({"family": name, "network": type(compiled.network).__name__, "compiled": compiled.compiled,
                     "compile_seconds": round(clf.engine.stats.compile_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - started, 1),
                     "max_relative_difference": float(np.nanmax(np.abs(result.errors - eager.errors) / eager.errors))})
        print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    atomic_write_text(json.dumps({"torch": torch.__version__, "device": "cpu", "rows": rows,
                                  "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n",
                      RESULTS / "compile_check.json")


if __name__ == "__main__":
    main()
