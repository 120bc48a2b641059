"""Findings of issue #36: one image given alone, channel-first arrays, a folder given as an image, a closed pipe
after --json, elimination evidence keyed by name, help text, options the strategy or model does not use."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier, Elimination
from diffusion_classifier.cli import build_parser, main
from diffusion_classifier.engine.strategies import Exhaustive
from diffusion_classifier.errors import UserError

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


def test_report_filters_apply_to_every_line(models, tmp_path, capsys):
    """Finding 5: --t-min re-scored the accuracy but not the accuracy-vs-timesteps lines or error_by_timestep."""
    import json

    from .conftest import image_folder

    data = image_folder(tmp_path / "data", ["a", "b"], 2, size=8, mode="L")
    run_dir = tmp_path / "run"
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels", "0,1",
                 "--out", str(run_dir), "--timesteps", "10", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir), "--t-min", "500", "--no-plots", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = [t for t in report["error_by_timestep"]["timesteps"]]
    assert kept and min(kept) >= 500 and len(kept) == 5  # 5 of the 10 even timesteps lie above 500
    assert max(row["timesteps"] for row in report["accuracy_vs_timesteps"]) == len(kept)
    assert main(["report", str(run_dir), "--t-min", "500", "--no-plots"]) == 0
    assert "only the stored timesteps in [500, the largest]" in capsys.readouterr().out


def test_a_calibration_holds_only_for_its_settings_and_needs_enough_images(models, tmp_path, capsys):
    """Finding 6: --calibration applied a temperature fitted at other settings, labelled "given"; calibrate fitted
    on 2 images without a word."""
    import json

    from .conftest import image_folder

    data = image_folder(tmp_path / "data", ["a", "b"], 20, size=8, mode="L")
    run_dir = tmp_path / "run"
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels", "0,1",
                 "--out", str(run_dir), "--timesteps", "4", "--quiet"]) == 0
    assert main(["calibrate", str(run_dir)]) == 0
    capsys.readouterr()
    image = str(next((data / "a").iterdir()))
    classify = ["classify", image, "--model", str(models["pixel_class"]), "--calibration", str(run_dir), "--json"]
    assert main(classify + ["--timesteps", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["probabilities"] == "calibrated"
    for extra, reason in ((["--timesteps", "4", "--loss", "l1"], "it was fitted with loss l2, this run uses l1"),
                          (["--timesteps", "50"], "it was fitted at 4 timesteps and holds for 1 to 16")):
        assert main(classify + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the calibration does not hold for these settings" in err[0] and reason in err[0]

    small = image_folder(tmp_path / "small", ["a", "b"], 3, size=8, mode="L")
    small_run = tmp_path / "small-run"
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(small), "--labels", "0,1",
                 "--out", str(small_run), "--timesteps", "2", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(small_run)]) == 2
    assert "calibrate fits on at least 20" in capsys.readouterr().err
    assert not (small_run / "calibration.json").exists()


def test_evaluate_says_nothing_about_probabilities_it_does_not_show(tmp_path, capsys):
    """Finding 4: evaluate warned that the stored temperature does not apply although it shows no probabilities;
    classify, which shows them, still says so."""
    from .conftest import image_folder

    data = image_folder(tmp_path / "data", ["a", "b"], 1, size=28, mode="L")
    assert main(["evaluate", "--model", "fashion-mnist-class", "--data", str(data), "--labels", "0,1",
                 "--out", str(tmp_path / "run"), "--timesteps", "2", "--loss", "l1", "--quiet"]) == 0
    assert "calibrated" not in capsys.readouterr().err
    assert main(["classify", str(data / "a" / "0.png"), "--model", "fashion-mnist-class", "--timesteps", "2",
                 "--loss", "l1"]) == 0
    assert "probabilities are not calibrated" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["classify", "evaluate"])
def test_candidates_a_class_model_lacks_are_refused_before_it_loads(models, tmp_path, capsys, monkeypatch, command):
    """Finding 4: --labels cat,dog on a class model loaded it first (about 6 s), then failed; evaluate on a folder
    of other class names likewise."""
    from diffusion_classifier.adapters import loading

    from .conftest import image_folder

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_denoiser", no_loading)
    data = image_folder(tmp_path / "data", ["car", "bus"], 1, size=8, mode="L")
    target = [str(data / "car" / "0.png")] if command == "classify" else ["--data", str(data), "--out",
                                                                         str(tmp_path / "run")]
    for extra, message in ((["--labels", "car,bus"], "label 'car' is not one of the model's classes"),
                           (["--template", "a {}"], "apply to text-conditioned models")):
        code = main([command, *target, "--model", str(models["pixel_class"]), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


def test_a_wide_image_into_a_square_model_says_how_much_is_cut_off(clf, capsys):
    """Finding 7: a 100x40 image went into the 28x28 class model without the warning the pairs model gives; a
    4:3 photo (the paper's center crop) still goes in quietly."""
    from PIL import Image

    clf.classify([Image.new("L", (40, 30))])
    assert "cut off" not in capsys.readouterr().err
    clf.classify([Image.new("L", (100, 40))])
    err = capsys.readouterr().err
    assert "a 100x40 image goes into a model that takes 8x8 (width x height)" in err and "60% of it is cut off" in err


def test_evaluate_takes_more_candidates_than_the_data_has_classes(models, tmp_path, capsys):
    """A test subset of a many-class task need not hold every class: --labels naming all candidates, the data's
    class names among them, matches images to candidates by name."""
    import json

    from .conftest import image_folder

    data = image_folder(tmp_path / "data", ["dog", "cat"], 1, size=8, mode="L")
    out = tmp_path / "run"
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels",
                 "bird,cat,dog,fish", "--out", str(out), "--timesteps", "2", "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["images"] == 2
    from diffusion_classifier.store import ResultsStore

    with ResultsStore(out) as store:
        config = store.config()
        stored = sorted((row.id, row.label) for row in store.rows())
    assert config["labels"] == ["bird", "cat", "dog", "fish"]
    assert [label for _, label in stored] == [1, 2]  # cat/0.png is candidate 1, dog/0.png candidate 2
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels", "bird,cat,fish",
                 "--out", str(tmp_path / "other"), "--timesteps", "2"]) == 2
    assert "labels that include every class name of the data" in capsys.readouterr().err
