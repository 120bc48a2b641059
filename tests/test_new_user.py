"""What a new user tripped over (issue 26), each as the command that showed it: truncated captions, stale
temperatures, silent relabelling, presets overriding flags, tracebacks, silent mistakes, interface gaps."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier.cli import main

from .conftest import CLASSES, random_images
from .conftest import image_folder as make_image_folder

ROOT = Path(__file__).resolve().parents[1]
TROUSER = ROOT / "examples" / "fashion-mnist" / "test00002-trouser.png"
PREFIX = "a photo of a cat and a dog and a bird and a fish and a cat and a dog and"  # past 12 tokens


def _one_line_error(capsys, *phrases) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, err
    return err


@pytest.fixture
def pngs(tmp_path):
    paths = []
    for k, img in enumerate(random_images(2, size=8, mode="L")):
        paths.append(tmp_path / f"{k}.png")
        img.save(paths[-1])
    return paths


# ----- 1. captions past the model's text length ---------------------------------------------------

def test_texts_that_differ_only_past_the_cut_are_refused_not_ranked(models, pngs, capsys):
    code = main(["match", str(pngs[0]), "--model", str(models["pixel_text"]), "--timesteps", "2",
                 "--text", f"{PREFIX} a cat on the left", "--text", f"{PREFIX} a dog on the left"])
    assert code == 2
    _one_line_error(capsys, "identical within what the model reads", PREFIX[:20])


def test_a_long_but_distinct_text_is_scored_with_a_warning_naming_it(models, pngs, capsys):
    long_text = f"{PREFIX} two birds"
    assert main(["match", str(pngs[0]), "--model", str(models["pixel_text"]), "--timesteps", "2",
                 "--text", long_text, "--text", "a dog", "--json"]) == 0
    captured = capsys.readouterr()
    assert "longer than the model's 12 tokens" in captured.err and long_text in captured.err
    assert json.loads(captured.out)["ranking"]


def test_pairs_examples_whose_captions_tie_are_refused(models, pngs, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": str(pngs[0]), "true_caption": f"{PREFIX} a cat",
                                                      "false_caption": f"{PREFIX} a dog"}) + "\n")
    assert main(["evaluate", "--task", "pairs", "--data", str(tmp_path / "pairs.jsonl"), "--model",
                 str(models["pixel_text"]), "--out", str(tmp_path / "run"), "--timesteps", "2", "--quiet"]) == 2
    _one_line_error(capsys, "identical within what the model reads")


def test_classes_whose_prompts_tie_are_reported_as_a_tie(models, pngs, capsys):
    assert main(["classify", str(pngs[0]), "--model", str(models["pixel_text"]), "--timesteps", "2", "--json",
                 "--labels", "cat,dog", "--template", PREFIX + " {}"]) == 0
    captured = capsys.readouterr()
    row = json.loads(captured.out)
    assert row["tie"] and row["tied_with"] and all(entry["tie"] for entry in row["ranking"])
    assert "tie exactly" in captured.err


def test_evaluate_counts_exact_ties(models, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", ["cat", "dog"], per_class=2)
    assert main(["evaluate", "--model", str(models["pixel_text"]), "--data", str(folder), "--template",
                 PREFIX + " {}", "--timesteps", "2", "--out", str(tmp_path / "run"), "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[-1])["ties"] == 4 and "4 ties" in out


# ----- 2. probabilities and the settings a temperature was fitted with ------------------------------

def _classify_json(capsys, *extra) -> tuple[dict, str]:
    assert main(["classify", str(TROUSER), "--model", "fashion-mnist-class", "--json", *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_a_stored_temperature_is_used_only_for_its_scoring_settings(capsys):
    row, err = _classify_json(capsys, "--timesteps", "10")
    assert row["probabilities"] == "calibrated" and row["ranking"][0]["probability"] > 0.9 and not err
    for extra in (["--target", "velocity"], ["--grid", "logit-normal"], ["--timesteps", "2"]):
        row, err = _classify_json(capsys, *extra)
        assert row["probabilities"] == "not calibrated" and "not calibrated" in err, extra
        assert row["ranking"][0]["probability"] < 0.5, extra  # temperature 1: no false confidence
    row, _ = _classify_json(capsys, "--timesteps", "2", "--temperature", "0.001")
    assert row["probabilities"] == "given"


def test_every_shipped_classifier_carries_a_temperature_with_its_settings():
    from diffusion_classifier.adapters.loading import load_denoiser

    for name in ("fashion-mnist-class", "fashion-mnist-text", "fashion-mnist-flow"):
        calibration = load_denoiser(name).info.calibration
        assert calibration["temperature"] > 0, name
        assert calibration["fitted_on"]["scoring"]["loss"] == "l2", name


# ----- 3. a preset on a class-conditional model of other classes --------------------------------------

def test_a_class_model_refuses_a_preset_of_other_classes(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "cifar", ["airplane", "truck"], per_class=1, size=28)
    assert main(["evaluate", "--model", "fashion-mnist-class", "--data", str(folder), "--preset", "cifar10",
                 "--out", str(tmp_path / "run"), "--timesteps", "1", "--quiet"]) == 2
    _one_line_error(capsys, "not this class-conditional model's", "--labels")
    assert not (tmp_path / "run" / "results.sqlite").exists()


# ----- 4. presets never override explicit flags, and are refused where they mean nothing -------------

def test_an_explicit_timesteps_wins_over_a_presets_schedule(models, pngs, capsys):
    assert main(["classify", str(pngs[0]), "--model", str(models["pixel_text"]), "--preset", "cifar10",
                 "--timesteps", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 10 * 2  # not the preset's 2,750


@pytest.mark.parametrize("extra, phrase", [
    (["--preset", "cifar10"], "--preset applies to classification"),
    (["--labels", "a,b"], "--labels / --labels-file applies to classification"),
    (["--template", "a {}"], "--template / --templates-file applies to classification"),
])
def test_classification_options_are_refused_for_winoground_naming_real_flags(models, tmp_path, capsys, extra,
                                                                             phrase):
    assert main(["evaluate", "--task", "winoground", "--data", str(tmp_path / "m.jsonl"), "--model",
                 str(models["pixel_text"]), "--out", str(tmp_path / "run"), *extra]) == 2
    _one_line_error(capsys, phrase)


def test_match_takes_no_preset(models, pngs, capsys):
    assert _exit_code(["match", str(pngs[0]), "--model", str(models["pixel_text"]), "--text", "a cat",
                       "--preset", "cifar10"]) == 2
    _one_line_error(capsys, "unrecognized arguments: --preset")


# ----- 5. tracebacks -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, phrase", [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--resolution", "0"], "--resolution must be at least 8"),
    (["--resolution", "14", "--architecture", "class-tiny"], "--resolution must be a multiple of 4 for class-tiny"),
    (["--max-minutes", "0"], "--max-minutes must be positive"),
    (["--max-minutes", "-2"], "--max-minutes must be positive"),
    (["--ema-decay", "1.5"], "--ema-decay must lie in [0, 1)"),
    (["--checkpoint-minutes", "-1"], "--checkpoint-minutes must be at least 0"),
])
def test_train_refuses_bad_settings_before_creating_anything(tmp_path, capsys, extra, phrase):
    folder = make_image_folder(tmp_path / "data", CLASSES, per_class=1)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "model"), "--quiet", *extra]) == 2
    _one_line_error(capsys, phrase)
    assert not (tmp_path / "model").exists()


def test_train_refuses_a_one_class_folder(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", ["cat"], per_class=2)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "model"), "--max-steps", "1",
                 "--quiet"]) == 2
    _one_line_error(capsys, "at least two classes")
    assert not (tmp_path / "model").exists()


def test_serve_on_a_busy_port_is_a_one_line_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--model", "fashion-mnist-class", "--port", str(port)]) == 2
    _one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_page_errors_reach_the_page_without_a_server_traceback():
    gradio = pytest.importorskip("gradio")
    from diffusion_classifier.demo import DemoModel, _user_error
    from diffusion_classifier.errors import UserError

    with pytest.raises(UserError, match="drop or pick an image"):
        DemoModel("fashion-mnist-class").run(None, "", "", 2)
    error = _user_error(gradio, "drop or pick an image first")
    assert isinstance(error, gradio.Error) and getattr(error, "print_exception", False) is False


# ----- 6. silent mistakes ------------------------------------------------------------------------------

def test_pairs_runs_refuse_a_normalisation(models, tmp_path, capsys):
    assert main(["evaluate", "--task", "pairs", "--data", str(tmp_path / "p.jsonl"), "--model",
                 str(models["pixel_text"]), "--out", str(tmp_path / "run"), "--normalize", "none"]) == 2
    _one_line_error(capsys, "--normalize applies to --task winoground")


def test_an_image_of_another_shape_than_a_pairs_model_takes_is_named(capsys):
    from diffusion_classifier.data import preprocess

    pixels = preprocess(random_images(1, size=28, mode="L"), (28, 56), channels=1)
    assert pixels.shape == (1, 1, 28, 56)
    assert "a 28x28 image goes into a model that takes 56x28" in capsys.readouterr().err
    preprocess(random_images(1, size=20, mode="L"), 16, channels=1)  # square into square: the paper's crop, quiet
    assert capsys.readouterr().err == ""


def test_rankings_say_how_many_timesteps_each_score_rests_on(models, pngs, capsys):
    texts = ["a cat", "a dog", "two birds"]
    args = ["match", str(pngs[0]), "--model", str(models["pixel_text"]), "--strategy", "staged",
            "--n-samples", "2", "4", "--to-keep", "1", "1"]
    assert main(args + [arg for t in texts for arg in ("--text", t)] + ["--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert ranking[0]["timesteps"] == 4 and {e["timesteps"] for e in ranking[1:]} == {2}
    assert main(args + [arg for t in texts for arg in ("--text", t)]) == 0
    table = capsys.readouterr().out
    assert "over 4 timesteps" in table and "over 2 timesteps" in table


# ----- 7. the interface --------------------------------------------------------------------------------

def test_usage_errors_are_one_line_with_a_pointer_to_help(capsys):
    assert _exit_code(["classify", "--bogus"]) == 2
    _one_line_error(capsys, "see diffusion-classifier classify --help")
    assert _exit_code(["classify", str(TROUSER), "--model", "fashion-mnist-class", "--top-k", "0"]) == 2
    _one_line_error(capsys, "--top-k", "at least 1")


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


def test_verbose_is_accepted_after_the_command(capsys):
    assert main(["classify", str(TROUSER), "--model", "fashion-mnist-class", "--timesteps", "2", "--verbose"]) == 0
    assert "Trouser" in capsys.readouterr().out


def test_half_precision_prints_no_third_party_warning(capfd):
    # capfd: library loggers write to the stderr they found at import, which capsys does not see
    assert main(["classify", str(TROUSER), "--model", "fashion-mnist-class", "--timesteps", "10",
                 "--dtype", "float16"]) == 0
    assert capfd.readouterr().err == ""


def test_scores_mean_the_same_thing_in_classify_and_match(models, pngs, capsys):
    assert main(["classify", str(pngs[0]), "--model", str(models["pixel_text"]), "--labels", "cat,dog",
                 "--template", "a {}", "--timesteps", "3", "--json"]) == 0
    classified = json.loads(capsys.readouterr().out)
    assert main(["match", str(pngs[0]), "--model", str(models["pixel_text"]), "--text", "a cat", "--text", "a dog",
                 "--timesteps", "3", "--json"]) == 0
    matched = json.loads(capsys.readouterr().out)
    assert classified["better"] == matched["better"] == "lower"
    by_label = {e["label"]: e["score"] for e in classified["ranking"]}
    by_text = {e["text"]: e["score"] for e in matched["ranking"]}
    np.testing.assert_allclose([by_text["a cat"], by_text["a dog"]], [by_label["cat"], by_label["dog"]], rtol=1e-6)
    assert matched["ranking"][0]["score"] <= matched["ranking"][1]["score"]  # best first, lower error


def test_help_texts_fit_their_command():
    from diffusion_classifier.adapters.loading import BUILTIN_MODELS
    from diffusion_classifier.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices and "match" in a.choices)
    match_help = sub.choices["match"].format_help()
    for classification_only in ("--class-tree", "--keep-groups", "--preset", "timesteps per class", "--temperature"):
        assert classification_only not in match_help
    classify_help = sub.choices["classify"].format_help()
    assert all(name in classify_help for name in BUILTIN_MODELS)  # whole: help wraps between words only


def test_the_page_ranks_captions_for_a_pairs_model():
    pytest.importorskip("gradio")
    from diffusion_classifier.demo import DemoModel

    page = DemoModel("fashion-mnist-pairs")
    assert page.pairs and page.default_labels == "" and "\n" in page.default_captions
    image = random_images(1, size=28, mode="L")[0].resize((56, 28))
    confidences, table, errors = page.run(image, "", "", 2, page.default_captions)
    assert confidences is None and "mean error (lower is better)" in table
    assert table.count("| 1 |") == 1 and table.count("| 2 |") == 1 and set(errors["label"]) <= set(
        page.default_captions.splitlines())
