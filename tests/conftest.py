"""Tiny random-weight models of every supported family (benchmarks/tiny_pipelines.py), saved with
save_pretrained and loaded back through the same path a user takes (load_denoiser / from_pretrained); each is
built the first time a test asks for it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.tiny_pipelines import (  # noqa: F401  (tests import these from here)
    CLASSES,
    build_dit,
    build_flux,
    build_pixel_class,
    build_pixel_text,
    build_sd3,
    build_sdxl,
    build_stable_diffusion,
    image_folder,
    random_images,
    tiny_clip,
    tiny_clip_with_projection,
    tiny_t5,
    tiny_vae,
)
from diffusion_classifier.runtime import tune_cpu_allocator

torch.set_num_threads(1)
tune_cpu_allocator()  # the library never retunes malloc itself; the CLI does at start, and so do we here

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "sd": build_stable_diffusion,
    "sd_v": lambda d: build_stable_diffusion(d, "v_prediction"),
    "dit": lambda d: build_dit(d, CLASSES),
    "pixel_class": lambda d: build_pixel_class(d, CLASSES),
    "pixel_text": build_pixel_text,
    "sd3": build_sd3,
    "sd3_no_t5": lambda d: build_sd3(d, with_t5=False),
    "sdxl": build_sdxl,
    "flux_schnell": build_flux,
    "flux_dev": lambda d: build_flux(d, guidance=True),
}


class TinyModels(Mapping):
    """{name: pipeline directory}, each pipeline built on first access (most tests need one or two)."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            from transformers.utils import logging

            level = logging.get_verbosity()
            logging.set_verbosity_error()  # transformers' once-per-process notices, not inside a test's output
            try:  # nor save_pretrained's progress bars
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    self.built[name] = BUILDERS[name](self.root / name)
            finally:
                logging.set_verbosity(level)
        return self.built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(BUILDERS)

    def __len__(self) -> int:
        return len(BUILDERS)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("models"))


@pytest.fixture
def images() -> list[Image.Image]:
    return random_images(3)
