"""Fitting the GPU: an automatic batch size that halves on out-of-memory with identical results, VAE encoding
in memory-bounded chunks, text-encoder placement outside a run's identity, and `estimate` from configs alone.
CUDA is absent here: out-of-memory is raised by a stand-in network, which is what the engine sees on a GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffusion_classifier import DiffusionClassifier, load_denoiser
from diffusion_classifier.adapters.estimate import estimate
from diffusion_classifier.cli import main
from diffusion_classifier.engine.strategies import Exhaustive, Staged
from diffusion_classifier.errors import UserError
from diffusion_classifier.runs import EvaluationRun, run_evaluation

from .conftest import image_folder, random_images


def out_of_memory_above(denoiser, limit: int, calls: list):
    """The denoiser's error() raising CUDA's out-of-memory error for batches larger than `limit`."""
    real = denoiser.error

    def error(x0, *args, **kwargs):
        calls.append(len(x0))
        if len(x0) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(x0, *args, **kwargs)

    denoiser.error = error


def test_an_automatic_batch_size_halves_on_out_of_memory_and_changes_nothing(models, capsys):
    images = random_images(3, size=8, mode="L")
    strategy = Staged([4, 8], [2, 1])
    fixed = DiffusionClassifier(load_denoiser(models["pixel_class"]), strategy=strategy, batch_size=5)
    expected = np.stack([r.errors for r in fixed.classify(images)])
    denoiser, calls = load_denoiser(models["pixel_class"]), []
    out_of_memory_above(denoiser, 5, calls)
    auto = DiffusionClassifier(denoiser, strategy=strategy)  # batch_size "auto": 256 on the CPU
    assert auto.config.batch_size == "auto"
    np.testing.assert_array_equal(np.stack([r.errors for r in auto.classify(images)]), expected)
    assert calls[0] > 5 and max(calls[calls.index(max(c for c in calls if c <= 5)):]) <= 5
    assert auto.engine.batch_size == 4  # 256 -> 128 -> ... -> 4
    err = capsys.readouterr().err
    assert err.count("--batch-size auto: 4 evaluations per pass fit this GPU") == 1


def test_out_of_memory_at_a_fixed_batch_size_is_one_line_with_what_to_try(models):
    denoiser, calls = load_denoiser(models["pixel_class"]), []
    out_of_memory_above(denoiser, 0, calls)
    for batch_size, hint in ((16, "try --batch-size auto or a smaller one"), ("auto", "--text-encoders cpu")):
        clf = DiffusionClassifier(denoiser, strategy=Exhaustive(2), batch_size=batch_size)
        with pytest.raises(UserError, match=r"out of GPU memory at batch size (16|1): .*" + hint) as caught:
            clf.classify(random_images(1, size=8, mode="L"))
        assert "\n" not in str(caught.value)


def test_the_vae_encodes_in_memory_bounded_chunks_with_the_same_latents(models, monkeypatch):
    denoiser = load_denoiser(models["sd"])
    pixels = torch.rand(5, 3, 16, 16) * 2 - 1
    whole = denoiser.encode_images(pixels)
    assert denoiser.vae_chunk(16, 16) >= 5
    calls = []
    encode = denoiser.vae.encode
    monkeypatch.setattr(denoiser.vae, "encode", lambda x: calls.append(len(x)) or encode(x))
    monkeypatch.setattr(type(denoiser), "VAE_CHUNK_BYTES", 2 * 5 * 16 * 16 * 16 * 4)  # two images per call
    torch.testing.assert_close(denoiser.encode_images(pixels), whole, rtol=1e-5, atol=1e-6)
    assert calls == [2, 2, 1]
    assert denoiser.vae_chunk(1024, 1024) == 1  # at least one image per call, however large


def test_text_encoder_placement_is_not_part_of_a_runs_identity(models, tmp_path):
    data = image_folder(tmp_path / "data", ["cat", "dog"], 2, size=16, mode="RGB")
    run = dict(model=str(models["sd"]), data=str(data), out=str(tmp_path / "run"),
               scoring={"strategy": Exhaustive(2)})
    first = run_evaluation(EvaluationRun(**run, text_encoders="cpu"), progress=False, max_new=2)
    assert not first["complete"]
    assert run_evaluation(EvaluationRun(**run, text_encoders="gpu"), progress=False)["complete"]
    with pytest.raises(UserError, match="--text-encoders: choose"):
        load_denoiser(models["sd"], text_encoders="disk")


def test_estimate_reads_configs_only_and_counts_the_real_weights(models, tmp_path):
    configs = tmp_path / "configs-only"
    shutil.copytree(models["sdxl"], configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = estimate(configs, batch_size=64, memory="1GB", text_encoders="gpu")
    real = load_denoiser(models["sdxl"], dtype="bfloat16")
    for component in result.components:
        module = real.components()[component["name"]]
        size = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        assert component["gib"] * 2**30 == pytest.approx(size), component["name"]
        assert component["where"] == "gpu"
    assert result.peak_gib > sum(c["gib"] for c in result.components)  # activations come on top
    assert result.activation_gib_per_sample > 0
    smaller = estimate(configs, batch_size=64, memory=0.5 * 2**30)
    assert 0 < smaller.max_batch_size < result.max_batch_size
    assert {c["where"] for c in smaller.components if "text_encoder" in c["name"]} == {"cpu after embedding"}
    at_twice = estimate(configs, batch_size=128)
    assert at_twice.peak_gib > estimate(configs, batch_size=64).peak_gib
    for tokenizer in ("tokenizer", "tokenizer_2"):  # only model_index.json and config files
        for path in (configs / tokenizer).iterdir():
            if path.name != "tokenizer_config.json":
                path.unlink()
    without = estimate(configs, batch_size=64, memory="1GB", text_encoders="gpu")
    assert without.components == result.components
    assert without.peak_gib == pytest.approx(result.peak_gib, rel=0.01)


def test_the_estimate_command(models, capsys):
    code = main(["estimate", "--model", str(models["flux_schnell"]), "--memory", "2GB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["max_batch_size"] > 0 and out["peak_gib"] > 0 and out["batch_size"] == 256
    assert main(["estimate", "--model", str(models["dit"]), "--batch-size", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
