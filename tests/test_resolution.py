"""--resolution: latent models whose networks take any size score at another image side; fixed-size
networks refuse in one line."""

import json

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier, Exhaustive, UserError, load_denoiser
from diffusion_classifier.cli import main

from .conftest import random_images


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux_schnell"])
def test_latent_models_score_at_another_resolution(models, family):
    denoiser = load_denoiser(models[family])
    native = denoiser.image_size
    pixels = 2 * native[0]
    denoiser.set_resolution(pixels)
    assert denoiser.image_size == (pixels, pixels)
    labels = ["a cat", "a dog"]
    clf = DiffusionClassifier(denoiser, labels=labels, strategy=Exhaustive(3))
    (result,) = clf.classify(random_images(1, size=20))
    assert result.nfe == 6 and np.isfinite(result.errors).all()
    assert clf.describe()["resolution"] == pixels  # recorded with runs, so a resume cannot mix sizes


def test_flux_shift_follows_the_scored_resolution(models):
    denoiser = load_denoiser(models["flux_schnell"])
    if not denoiser.scheduler.config.get("use_dynamic_shifting"):
        pytest.skip("this tiny Flux scheduler has a fixed shift")
    before = denoiser.schedule.shift
    denoiser.set_resolution(4 * denoiser.image_size[0])
    assert denoiser.schedule.shift > before  # more tokens, more shift (diffusers' calculate_shift)


def test_a_run_at_another_resolution_leaves_the_callers_model_alone(models, tmp_path):
    from diffusion_classifier import EvaluationRun, run_evaluation

    from .conftest import CLASSES, image_folder

    denoiser = load_denoiser(models["flux_schnell"])
    native, schedule = denoiser.image_size, denoiser.schedule
    metrics = run_evaluation(EvaluationRun(model=models["flux_schnell"], data=image_folder(tmp_path / "d", CLASSES, 1),
                                           out=tmp_path / "run", resolution=2 * native[0],
                                           scoring={"strategy": Exhaustive(2)}), denoiser, progress=False)
    assert metrics["images"] == len(CLASSES)
    assert denoiser.image_size == native and denoiser.schedule is schedule and denoiser.scoring_resolution is None
    assert json.loads((tmp_path / "run" / "run.json").read_text())["resolution"] == 2 * native[0]


@pytest.mark.parametrize("family", ["dit", "pixel_class", "pixel_text"])
def test_fixed_size_networks_refuse_another_resolution(models, family):
    with pytest.raises(UserError, match="takes one size"):
        load_denoiser(models[family]).set_resolution(64)


def test_resolution_must_be_a_multiple_of_the_networks_stride(models):
    denoiser = load_denoiser(models["sd"])
    with pytest.raises(UserError, match="multiple of"):
        denoiser.set_resolution(denoiser.size_multiple + 1)


def test_cli_resolution_on_a_fixed_size_model_is_a_one_line_error(models, tmp_path, capsys):
    image = tmp_path / "x.png"
    random_images(1, size=8, mode="L")[0].save(image)
    code = main(["classify", str(image), "--model", str(models["pixel_class"]), "--resolution", "16"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "takes one size" in err
