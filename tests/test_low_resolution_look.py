"""A first look at a lower resolution (latent models): the shortlist from a smaller encoding of the image, then
elimination at the model's own resolution among it; fitted from two exhaustive runs (calibrate --look-run)."""

import json

import numpy as np
import pytest
import torch.nn.functional as F

from diffusion_classifier import DiffusionClassifier, Elimination, load_denoiser
from diffusion_classifier.adapters.schedules import as_schedule
from diffusion_classifier.data import preprocess
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.shortlists import FirstLook, relative_gaps
from diffusion_classifier.engine.strategies import FixedTimesteps
from diffusion_classifier.errors import UserError

from .conftest import image_folder, random_images

NAMES = ["dog", "cat", "bird", "fish", "frog", "horse"]
TEMPLATES = ["{}"]


def _look(timesteps, max_gap, resolution=8):
    return FirstLook(tuple(timesteps), max_gap, miss_rate=0.1, grid=8, fitted_on=0, held_out_shortlist=0.0,
                     resolution=resolution)


def test_the_look_scores_a_smaller_encoding_and_elimination_goes_on_among_its_shortlist(models):
    """The tiny SD pipeline is native at 16 px; its look at 8 px scores every class at the look's timesteps on the
    image downsampled (the same errors a classifier of the 8 px twin gives), keeps those within max_gap of the best,
    and elimination at 16 px sees only them; the NFE counts both, the low-resolution part said apart."""
    image = random_images(1, size=16, mode="RGB", seed=3)
    grid = as_schedule(1000).grid(8, 0)
    timesteps = [grid[2], grid[5]]
    denoiser = load_denoiser(models["sd"])
    pixels = preprocess(image, denoiser.image_size, denoiser.image_channels)
    small = F.interpolate(pixels, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    twin = DiffusionClassifier(denoiser.at_resolution(8), labels=NAMES, templates=TEMPLATES,
                               strategy=FixedTimesteps(timesteps))
    low = twin.classify_pixels(small, ["img"])[0]
    gaps = relative_gaps(low.errors[None, :, 0, :], [0, 1])[0]
    max_gap = float(np.sort(gaps)[2])  # keeps three of the six
    kept = {NAMES[c] for c in np.flatnonzero(gaps <= max_gap)}
    assert len(kept) == 3

    strategy = Elimination(0.05, max_timesteps=8, first_look=_look(timesteps, max_gap))
    clf = DiffusionClassifier(denoiser, labels=NAMES, templates=TEMPLATES, strategy=strategy)
    result = clf.classify_pixels(pixels, ["img"])[0]
    assert result.extra["nfe_low_resolution"] == len(NAMES) * 2
    dropped = {name for name, why in result.extra["evidence"].items() if why.get("by") == "first look at 8 px"}
    assert dropped == set(NAMES) - kept
    assert all(result.timesteps_per_label[name] == 0 for name in dropped)
    assert all(result.timesteps_per_label[name] >= 1 for name in kept)
    assert result.prediction in kept and {label for label, _ in result.ranking[:3]} == kept
    full = result.nfe - result.extra["nfe_low_resolution"]
    assert full == sum(result.timesteps_per_label.values())  # one prompt per class
    again = clf.classify_pixels(pixels, ["img"])[0]
    assert again.prediction == result.prediction and again.nfe == result.nfe  # seeded

    one = DiffusionClassifier(denoiser, labels=NAMES, templates=TEMPLATES,
                              strategy=Elimination(0.05, max_timesteps=8, first_look=_look(timesteps, 0.0)))
    alone = one.classify_pixels(pixels, ["img"])[0]  # the look left one class: it is scored once and predicted
    assert alone.prediction == NAMES[int(np.argmin(gaps))] and alone.nfe == len(NAMES) * 2 + 1


def test_a_low_resolution_look_is_refused_where_it_cannot_run(models):
    strategy = Elimination(0.05, max_timesteps=8, first_look=_look([125, 625], 0.1))
    with pytest.raises(UserError, match="takes one size"):
        DiffusionClassifier.from_pretrained(models["pixel_text"], labels=NAMES, templates=TEMPLATES,
                                            strategy=strategy)
    with pytest.raises(UserError, match="not below this model's 16 px"):
        DiffusionClassifier.from_pretrained(models["sd"], labels=NAMES, templates=TEMPLATES,
                                            strategy=Elimination(0.05, max_timesteps=8,
                                                                 first_look=_look([125, 625], 0.1, resolution=16)))
    errors = np.ones((len(NAMES), 1, 8))
    with pytest.raises(UserError, match="a replay of stored errors cannot"):
        replay(strategy, errors, as_schedule(1000).grid(8, 0))


def test_calibrate_fits_a_look_from_a_low_resolution_run_that_evaluate_uses(models, tmp_path, capsys):
    from diffusion_classifier.cli import main

    data = image_folder(tmp_path / "data", NAMES, 2, size=16, mode="RGB")
    full, small = tmp_path / "full", tmp_path / "small"
    for out, extra in ((full, []), (small, ["--resolution", "8"])):
        assert main(["evaluate", "--model", str(models["sd"]), "--data", str(data), "--out", str(out),
                     "--labels", ",".join(NAMES), "--timesteps", "8", "--quiet", *extra]) == 0
    capsys.readouterr()
    code = main(["calibrate", str(full), "--first-look", "2", "--miss-rate", "0.25", "--look-run", str(small),
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    look = FirstLook.from_dict(json.loads(out.strip().splitlines()[-1]))
    assert look.resolution == 8 and look.grid == 8 and len(look.timesteps) == 2 and look.fitted_on == 12
    code = main(["evaluate", "--model", str(models["sd"]), "--data", str(data), "--out", str(tmp_path / "fast"),
                 "--labels", ",".join(NAMES), "--strategy", "elimination", "--first-look", str(full), "--quiet",
                 "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["images"] == 12 and len(NAMES) * 2 < metrics["nfe_per_image"] <= len(NAMES) * (2 + 8)
    for argv, message in ((["--look-run", str(full)], "was not scored at a chosen --resolution"),
                          (["--look-run", str(tmp_path / "missing")], "holds no"),
                          ([], None)):
        code = main(["calibrate", str(full), "--first-look", "2", "--miss-rate", "0.25", *argv])
        err = capsys.readouterr().err
        assert (code == 0) if message is None else (code != 0 and message in err), err
    code = main(["calibrate", str(full), "--look-run", str(small)])
    assert code != 0 and "--look-run goes with --first-look" in capsys.readouterr().err
