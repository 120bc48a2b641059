"""Exporting a trained network as a pipeline that `load_denoiser` reads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..adapters.class_unet import ClassUNetDenoiser
from ..adapters.text_unet import TextUNetDenoiser
from . import triples
from .config import TrainConfig, text_config


def export(network, scheduler, out_dir: Path, config: TrainConfig, class_names: list[str],
           stats: dict | None = None) -> None:
    """Save the EMA weights as a pipeline that `load_denoiser` reads (class names in model_index.json)."""
    network = (triples.materialise(network) if config.layout == "triples" else network).eval()
    extra = {"class_names": class_names, "id2label": {str(i): n for i, n in enumerate(class_names)}}
    if stats:
        extra["intensity_stats"] = stats
    if config.conditioning == "class":
        denoiser = ClassUNetDenoiser(network, scheduler, info=extra)
    else:
        extra.update(text_encoder_source=config.text_encoder, **text_config(config))
        # the pipeline names its encoder (text_encoder_source) instead of holding a copy, so none is needed here
        denoiser = TextUNetDenoiser(network, scheduler, info=extra)
    tmp = out_dir / ".export-tmp"
    denoiser.save_pretrained(tmp)
    for item in tmp.iterdir():  # swap each part in by rename, so a reader never sees a half-written model
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
