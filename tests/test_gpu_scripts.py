"""The prepared GPU scripts run end to end in their --tiny CPU mode, so they do not rot between leases."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_classifier.data import fashion_mnist_dir
from diffusion_classifier.errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", *args], capture_output=True, text=True,
                          cwd=BENCHMARKS, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_gpu_throughput_tiny(tmp_path):
    out = tmp_path / "throughput.json"
    _run("gpu_throughput.py", "--images", "2", "--seconds-per-rate", "0.5", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["what"]: row for row in result["rows"]}
    assert {"per-image loop float32", "engine default (float32)"} <= set(rows)
    engine = rows["engine default (float32)"]
    assert engine["forwards_per_s"] > 0 and engine["vs_loop"] > 0 and engine["vs_ceiling"] > 0
    assert result["nfe_per_image"] == 10 * 4 + 2 * 6  # Staged([4, 10], [2, 1]) over 10 classes


def test_gpu_training_tiny(tmp_path):
    try:
        fashion_mnist_dir()
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    _run("gpu_training.py", "--out-dir", str(tmp_path), "--sections", "cnn", "ddpm", "--curve-minutes", "0.02")
    result = json.loads((tmp_path / "gpu_training.json").read_text())
    ddpm = result["sections"]["ddpm"]
    assert ddpm["training"]["steps"] >= 1 and ddpm["scoring"]["images"] == result["test_images"]
    assert set(ddpm["exhaustive"]) == {"100 NFE", "50 NFE", "20 NFE"}
    assert [point["minutes"] for point in ddpm["curve"]] == [0.02] and ddpm["curve"][0]["images"] > 0
    assert [row["augmentation"] for row in result["sections"]["cnn"]] == ["none", "flips+shifts"]
    assert "ddpm 100 NFE minus cnn none" in result["paired"] or "cnn none minus ddpm 100 NFE" in result["paired"]
    assert (tmp_path / "ddpm.tar").stat().st_size > 0
