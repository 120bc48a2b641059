"""Findings of issue #36: one image given alone, channel-first arrays, a folder given as an image, a closed pipe
after --json, elimination evidence keyed by name, help text, options the strategy or model does not use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier, Elimination
from diffusion_classifier.cli import build_parser, main
from diffusion_classifier.errors import UserError
from diffusion_classifier.strategies import Exhaustive

from .conftest import random_images


@pytest.fixture(scope="module")
def clf(models):
    return DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(2))


def test_one_path_image_or_array_is_one_image(clf, tmp_path):
    image = random_images(1, size=8, mode="L")[0]
    path = tmp_path / "shoe.png"
    image.save(path)
    expected = clf.predict([image])
    assert list(clf.predict(str(path))) == list(expected) and list(clf.predict(path)) == list(expected)
    assert list(clf.predict(image)) == list(expected)
    array = np.asarray(image)
    for one in (array, array[None], array[:, :, None]):  # HxW, CxHxW, HxWxC
        assert list(clf.predict(one)) == list(expected), one.shape
    assert clf.predict_proba(array).shape == (1, len(clf.classes_))
    assert len(clf.predict(np.stack([array[None], array[None]]))) == 2  # a batch [N, C, H, W] is N images
    with pytest.raises(UserError, match="HxW, HxWxC or CxHxW"):
        clf.predict(np.zeros((2, 5, 8, 8)))


def test_a_folder_given_as_an_image_says_so(models, tmp_path, capsys):
    code = main(["classify", str(tmp_path), "--model", str(models["pixel_class"]), "--timesteps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "is a directory, not an image" in err and len(err.strip().splitlines()) == 1


def test_a_closed_pipe_after_json_ends_quietly(models, tmp_path):
    paths = []
    for i, image in enumerate(random_images(3, size=8, mode="L")):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    command = (f"{sys.executable} -m diffusion_classifier classify {' '.join(paths)} --model {models['pixel_class']} "
               "--timesteps 2 --device cpu --json | head -1")
    done = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_elimination_evidence_is_keyed_by_class_name(models):
    clf = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Elimination(0.05, max_timesteps=20))
    (result,) = clf.classify(random_images(1, size=8, mode="L"))
    assert set(result.extra["evidence"]) <= set(clf.classes_) and result.extra["evidence"]


def test_help_says_classes_not_classs():
    parser = build_parser()
    for command in ("classify", "evaluate", "match"):
        assert "classs" not in parser._subparsers._group_actions[0].choices[command].format_help()


@pytest.mark.parametrize("timesteps, message", [(-5, "--timesteps must be at least 1"),
                                                (0, "--timesteps must be at least 1"),
                                                (100000, "scores up to 100000 timesteps per candidate, but")])
def test_impossible_timesteps_are_one_line_without_a_calibration_warning(models, tmp_path, capsys, timesteps, message):
    image = tmp_path / "shoe.png"
    random_images(1, size=8, mode="L")[0].save(image)
    code = main(["classify", str(image), "--model", str(models["pixel_class"]), "--timesteps", str(timesteps)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]


def test_a_preset_of_other_classes_is_refused_for_a_class_model(models, tmp_path, capsys):
    """Finding 1: the CIFAR-10 preset on a model of other classes used to run under the model's names."""
    image = tmp_path / "shoe.png"
    random_images(1, size=8, mode="L")[0].save(image)
    code = main(["classify", str(image), "--model", str(models["pixel_class"]), "--preset", "cifar10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cifar10 preset has 10 classes and this class-conditional model 4" in err[0]
    with pytest.raises(UserError, match="the pets preset has 37 classes"):
        DiffusionClassifier.from_pretrained(models["pixel_class"], preset="pets")


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "exhaustive", "--n-samples", "5", "10", "--to-keep", "3", "1"],
     "--strategy exhaustive does not use --n-samples (staged), --to-keep (staged)"),
    (["--error-rate", "0.1"], "the default strategy (a preset's schedule, else exhaustive) does not use --error-rate"),
    (["--timesteps", "4", "--max-nfe", "50"], "the exhaustive strategy its options choose does not use --max-nfe"),
    (["--shortlist", "2"], "does not use --shortlist (elimination): add --strategy elimination"),
    (["--strategy", "staged", "--n-samples", "2", "4", "--to-keep", "2", "1", "--error-rate", "0.1"],
     "--strategy staged does not use --error-rate (elimination)"),
    (["--strategy", "elimination", "--keep-groups", "3"], "--keep-groups is used with --class-tree only"),
    (["--noise-margin", "3"], "--noise-margin is used by --noise-aware scoring only"),
    (["--template", "a photo of a {}."], "apply to text-conditioned models; this model is class-conditional"),
])
def test_an_option_the_strategy_or_model_does_not_use_is_refused(models, tmp_path, capsys, extra, message):
    """Finding 2: each of these used to run, the option silently ignored (or another strategy run)."""
    image = tmp_path / "shoe.png"
    random_images(1, size=8, mode="L")[0].save(image)
    code = main(["classify", str(image), "--model", str(models["pixel_class"]), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_the_noise_margin_rule_holds_in_the_api(models):
    with pytest.raises(UserError, match="--noise-margin is used by --noise-aware"):
        DiffusionClassifier.from_pretrained(models["pixel_class"], noise_margin=3.0)
    DiffusionClassifier.from_pretrained(models["pixel_class"], noise_margin=3.0, noise_aware=True)
