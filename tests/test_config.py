"""The typed scoring configuration: flags built from it, runs store all of it and refuse to mix settings."""

import json
import shutil
from dataclasses import fields

import pytest

from diffusion_classifier import DiffusionClassifier, Exhaustive, ScoringConfig, UserError
from diffusion_classifier.cli import build_parser, main
from diffusion_classifier.engine.config import flag

from .conftest import image_folder

# One change per setting that affects results; the test below fails when a new setting has none here.
CHANGES = {
    "strategy": ["--timesteps", "3"],
    "loss": ["--loss", "l1"],
    "target": ["--target", "velocity"],
    "grid": ["--grid", "logit-normal"],
    "weighting": ["--weighting", "elbo"],
    "aggregate": ["--aggregate", "mean"],
    "seed": ["--seed", "1"],
    "interpolation": ["--interpolation", "bilinear"],
    "noise_aware": ["--noise-aware"],
    "noise_margin": ["--noise-margin", "3"],  # resumed with --noise-aware on both sides (below)
    "normalize_intensity": ["--normalize-intensity"],
}


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    data = image_folder(root / "data", ["cat", "dog"], 2)
    model = root / "model"
    shutil.copytree(models["pixel_class"], model)
    index = json.loads((model / "model_index.json").read_text())
    index["intensity_stats"] = {"low": -1.0, "high": 1.0, "low_band": [-1.0, -0.9], "high_band": [0.9, 1.0]}
    (model / "model_index.json").write_text(json.dumps(index))
    return data, model


def _evaluate(data, model, out, *extra):
    return main(["evaluate", "--model", str(model), "--data", str(data), "--out", str(out), "--timesteps", "2",
                 "--labels", "cat,dog", "--quiet", *extra])


def test_every_setting_that_affects_results_has_a_flag_and_a_change_under_test():
    result_fields = {f.name for f in fields(ScoringConfig) if f.metadata.get("affects_results", True)}
    assert result_fields == set(CHANGES)
    options = {a for action in build_parser()._subparsers._group_actions[0].choices["evaluate"]._actions
               for a in action.option_strings}
    for f in fields(ScoringConfig):
        if "help" in f.metadata:
            assert flag(f.name) in options


@pytest.mark.parametrize("setting", sorted(CHANGES))
def test_a_run_refuses_to_resume_with_any_setting_changed(setup, tmp_path, setting, capsys):
    data, model = setup
    base = ["--noise-aware"] if setting == "noise_margin" else []
    out = tmp_path / "run"
    assert _evaluate(data, model, out, *base) == 0
    capsys.readouterr()
    assert _evaluate(data, model, out, *base, *CHANGES[setting]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and setting in err and len(err.strip().splitlines()) == 1


def test_speed_settings_may_change_on_resume(setup, tmp_path):
    data, model = setup
    out = tmp_path / "run"
    assert _evaluate(data, model, out) == 0
    assert _evaluate(data, model, out, "--batch-size", "3", "--images-per-batch", "1") == 0


def test_an_existing_file_as_out_is_a_one_line_error(setup, tmp_path, capsys):
    data, model = setup
    out = tmp_path / "a-file"
    out.write_text("not a run")
    assert _evaluate(data, model, out) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "not a run"


def test_the_classifier_takes_a_config_or_its_fields(models):
    config = ScoringConfig(strategy=Exhaustive(3), seed=5)
    a = DiffusionClassifier.from_pretrained(models["pixel_class"], config=config)
    b = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(3), seed=5)
    assert a.describe() == b.describe() and a.config.seed == 5
    assert DiffusionClassifier.from_pretrained(models["pixel_class"], config=config, seed=6).config.seed == 6
    with pytest.raises(UserError, match="unknown scoring option"):
        DiffusionClassifier.from_pretrained(models["pixel_class"], sed=1)
    with pytest.raises(UserError, match="unknown loss"):
        ScoringConfig(loss="l3")
    described = ScoringConfig().describe()
    assert described["noise_margin"] is None  # inactive without noise-aware scoring
    assert described["target"] is None and ScoringConfig(target="velocity").describe()["target"] == "velocity"
