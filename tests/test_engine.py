"""The engine at the device's speed: padded fixed-shape batches, --compile and its fallbacks, --dtype auto,
and half precision against float32 on the shipped models."""

import glob
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, Staged, load_denoiser
from diffusion_classifier.runtime import parse_dtype

from .conftest import random_images

EXAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist" / "*.png")))


def _errors(results):
    return [r.errors for r in results]


@pytest.mark.parametrize("strategy", [Exhaustive(7), Staged([4, 10], [2, 1]), Elimination(max_timesteps=20)],
                         ids=["exhaustive", "staged", "elimination"])
def test_padding_batches_to_one_shape_changes_nothing(models, strategy, monkeypatch):
    """--compile pads every batch to --batch-size. With a stand-in for compiling (the network stays eager but
    counts as compiled) the padded batches must give the same errors (NaN where unevaluated) as unpadded ones."""
    from diffusion_classifier.adapters.denoiser import Denoiser

    denoiser = load_denoiser(models["pixel_class"])
    images = random_images(3, size=8, mode="L")
    plain = DiffusionClassifier(denoiser, strategy=strategy, batch_size=15).classify(images)

    def pretend_compile(self):
        self.compiled = True
        return True

    monkeypatch.setattr(Denoiser, "compile", pretend_compile)
    clf = DiffusionClassifier(denoiser, strategy=strategy, batch_size=15, compile=True)
    padded = clf.classify(images)
    assert clf.engine.stats.padded > 0 and clf.engine.stats.compile_seconds > 0  # padded; first call timed
    for a, b in zip(plain, padded):
        np.testing.assert_allclose(b.errors, a.errors, rtol=1e-5, equal_nan=True)
        assert a.prediction == b.prediction and a.nfe == b.nfe


def test_a_compiled_network_is_checked_against_eager_once(models, monkeypatch):
    """The eager check costs one batch: a second classifier on the same compiled network does not repeat it,
    so its timings are steady-state ones (benchmarks' second passes), and reports no compile time."""
    from diffusion_classifier.adapters.denoiser import Denoiser

    denoiser = load_denoiser(models["pixel_class"])
    checks = []
    eager = Denoiser.eager

    def counted_eager(self):
        checks.append(1)
        return eager(self)

    monkeypatch.setattr(Denoiser, "eager", counted_eager)
    monkeypatch.setattr(Denoiser, "compile", lambda self: setattr(self, "compiled", True) or True)
    images = random_images(2, size=8, mode="L")
    first = DiffusionClassifier(denoiser, strategy=Exhaustive(4), batch_size=8, compile=True)
    first.classify(images)
    second = DiffusionClassifier(denoiser, strategy=Exhaustive(4), batch_size=8, compile=True)
    second.classify(images)
    assert len(checks) == 1 and denoiser.compile_checked
    assert first.engine.stats.compile_seconds > 0 and second.engine.stats.compile_seconds == 0
    denoiser.uncompile()
    assert not denoiser.compile_checked


def test_compile_unavailable_is_a_one_line_warning_and_eager(models, monkeypatch, capsys):
    from diffusion_classifier import errors
    from diffusion_classifier.adapters import denoiser as denoisers

    monkeypatch.setattr(errors, "_WARNED", set())
    monkeypatch.setattr(denoisers, "compile_unavailable", lambda device: "compiling for the CPU needs a C++ "
                                                                         "compiler (none found)")
    denoiser = load_denoiser(models["pixel_class"])
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(4), batch_size=7, compile=True)
    results = clf.classify(random_images(2, 8, "L"))
    assert len(results) == 2 and not denoiser.compiled and clf.engine.stats.padded == 0  # eager: nothing padded
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffusion-classifier: warning: --compile: compiling for the CPU needs a C++ compiler "
                   "(none found); running eager"]


def test_a_compile_that_fails_at_its_first_call_falls_back_to_eager(models, monkeypatch, capsys):
    from diffusion_classifier import errors

    monkeypatch.setattr(errors, "_WARNED", set())
    denoiser = load_denoiser(models["pixel_class"])
    images = random_images(2, size=8, mode="L")
    eager = DiffusionClassifier(denoiser, strategy=Exhaustive(4)).classify(images)

    def broken_compile(**kwargs):  # as if inductor failed while compiling the graph
        def fail(*args, **kw):
            raise RuntimeError("InductorError: no working C compiler\nlong traceback")
        denoiser.network._compiled_call_impl = fail

    monkeypatch.setattr(denoiser.network, "compile", broken_compile)
    monkeypatch.setattr("diffusion_classifier.adapters.denoiser.compile_unavailable", lambda device: None)
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(4), compile=True)
    results = clf.classify(images)
    assert not denoiser.compiled and clf.engine.stats.compile_seconds == 0 and not clf.engine.compile  # no retry
    for a, b in zip(eager, results):
        np.testing.assert_allclose(b.errors, a.errors, rtol=1e-6)
    err = capsys.readouterr().err
    assert "compiling UNet2DModel failed (InductorError: no working C compiler); running eager" in err


def test_a_compiled_network_that_computes_wrong_errors_is_dropped(models, monkeypatch, capsys):
    """The first compiled batch is checked against the eager network on the same batch: a compiler bug that
    changes the network's output costs one warning line, and the results are eager's."""
    from diffusion_classifier import errors

    monkeypatch.setattr(errors, "_WARNED", set())
    denoiser = load_denoiser(models["pixel_class"])
    images = random_images(2, size=8, mode="L")
    eager = DiffusionClassifier(denoiser, strategy=Exhaustive(4)).classify(images)
    network = denoiser.network

    def wrong_compile(**kwargs):  # as if inductor miscompiled: outputs off by 50%
        def call(*args, **kw):
            out = network.forward(*args, **kw)
            out.sample = 1.5 * out.sample
            return out
        network._compiled_call_impl = call

    monkeypatch.setattr(network, "compile", wrong_compile)
    monkeypatch.setattr("diffusion_classifier.adapters.denoiser.compile_unavailable", lambda device: None)
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(4), compile=True)
    results = clf.classify(images)
    assert not denoiser.compiled and not clf.engine.compile
    for a, b in zip(eager, results):
        np.testing.assert_allclose(b.errors, a.errors, rtol=1e-6)
    err = capsys.readouterr().err
    assert "--compile: the compiled UNet2DModel's errors differ from eager ones by" in err and "running eager" in err


def test_compile_is_not_a_result_setting():
    from diffusion_classifier.engine.config import ScoringConfig

    assert "compile" not in ScoringConfig(compile=True).describe()


def test_dtype_auto_is_half_on_cuda_and_float32_on_the_cpu():
    assert parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert parse_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert parse_dtype("float16", torch.device("cuda")) == torch.float16  # an explicit dtype wins


# Measured on the 5 example images at 10 timesteps, both shipped models: a class's mean error (what ranks
# the classes) moved by at most 0.37% in bfloat16 and 0.10% in float16 relative to float32; one (class,
# timestep) error by at most 6.4e-4 / 7.1e-5 absolute (relatively more only at the smallest timesteps,
# where errors are ~1e-4). The tolerances are about 3x those maxima.
HALF_TOLERANCE = {torch.bfloat16: (2e-3, 0.012), torch.float16: (2.5e-4, 0.003)}  # (per error abs, mean rel)


@pytest.mark.parametrize("model", ["fashion-mnist-class", "fashion-mnist-text"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_errors_stay_close_to_float32_and_rank_alike(model, dtype):
    images = [Image.open(p) for p in EXAMPLES]
    options = dict(strategy=Exhaustive(10), batch_size=128)
    labels = None
    if model == "fashion-mnist-text":
        labels = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot"]
        options["templates"] = ["a photo of a {}."]
    full = DiffusionClassifier(load_denoiser(model), labels=labels, **options).classify(images)
    half = DiffusionClassifier(load_denoiser(model, dtype=dtype), labels=labels, **options).classify(images)
    per_error, per_mean = HALF_TOLERANCE[dtype]
    for a, b in zip(full, half):
        np.testing.assert_allclose(b.errors, a.errors, rtol=0, atol=per_error)
        np.testing.assert_allclose(b.mean_errors, a.mean_errors, rtol=per_mean)
    assert [r.prediction for r in half] == [r.prediction for r in full]
