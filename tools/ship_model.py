"""Copy a trained model (the EMA export of `diffusion-classifier train`) into the package as a built-in.

    python tools/ship_model.py train-runs/fashion-mnist-class fashion-mnist-class

Copies model_index.json, the network and scheduler folders; leaves checkpoint.pt behind
(see checkpoints/ for resuming training) and keeps the model card (README.md) if present.
"""

import json
import shutil
import sys
from pathlib import Path

import torch

PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "src" / "diffusion_classifier" / "models"


def ship(run_dir: Path, name: str) -> Path:
    target = PACKAGE_MODELS / name
    target.mkdir(parents=True, exist_ok=True)
    for item in run_dir.iterdir():
        if item.name in ("checkpoint.pt",) or item.name.startswith("."):
            continue
        destination = target / item.name
        if item.is_dir():
            shutil.rmtree(destination, ignore_errors=True)
            shutil.copytree(item, destination)
        else:
            shutil.copy2(item, destination)
    add_intensity_stats(target / "model_index.json")
    return target


def add_intensity_stats(index_path: Path) -> None:
    """Runs trained before `train` stored the intensity range get it from the same training images."""
    index = json.loads(index_path.read_text())
    if {"low", "high", "low_band", "high_band"} <= index.get("intensity_stats", {}).keys():
        return
    from diffusion_classifier.data import fashion_mnist_arrays
    from diffusion_classifier.engine.robust import intensity_stats

    images, _ = fashion_mnist_arrays("train")
    index["intensity_stats"] = intensity_stats(torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1))
    index_path.write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    print(ship(Path(sys.argv[1]), sys.argv[2]))
