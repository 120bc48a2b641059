import json
import subprocess
import sys

import numpy as np
import pytest

from diffusion_classifier.cli import main

from .conftest import CLASSES, random_images
from .conftest import image_folder as make_image_folder


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, img in enumerate(random_images(2)):
        path = tmp_path / f"img{i}.png"
        img.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data", ["dog", "cat"], 2, size=20, mode="RGB")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_prints_a_ranked_table(models, image_files, capsys):
    code, out, err = run(capsys, "classify", *image_files, "--model", models["sd"], "--labels", "cat,dog,bird",
                         "--template", "a photo of a {}.", "--timesteps", "3", "--top-k", "2")
    assert code == 0, err
    assert out.count(" 1. ") == 2 and out.count(" 2. ") == 2 and " 3. " not in out


def test_classify_json_has_the_contract_fields(models, image_files, capsys):
    code, out, _ = run(capsys, "classify", *image_files, "--model", models["dit"], "--n-samples", "25", "250",
                       "--to-keep", "5", "1", "--json", "--top-k", "4")  # the pets preset's schedule
    assert code == 0
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert {"image", "prediction", "ranking", "nfe"} <= set(row)
        assert row["prediction"] == row["ranking"][0]["label"]
        assert row["nfe"] == 4 * 25 + 4 * 225  # 4 classes: everyone survives stage 1
        assert [r["label"] for r in row["ranking"]] != [] and set(r["label"] for r in row["ranking"]) == set(CLASSES)


def test_evaluate_reports_metrics_as_json_and_resumes(models, image_folder, tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["evaluate", "--model", models["pixel_text"], "--data", image_folder, "--out", out_dir,
            "--timesteps", "2", "--json", "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["images"] == 4 and metrics["nfe_per_image"] == 4
    for key in ("accuracy", "mean_per_class_accuracy", "seconds_per_image"):
        assert key in metrics
    assert (out_dir / "results.sqlite").is_file() and (out_dir / "metrics.json").is_file()
    code, out, _ = run(capsys, *args)  # resume: nothing left to do, same metrics
    resumed = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and resumed.pop("images_this_run") == 0 and metrics.pop("images_this_run") == 4
    assert resumed == metrics
    code, _, err = run(capsys, *args[:-2], "--timesteps", "3", "--json", "--quiet")
    assert code != 0 and "another configuration" in err


def test_evaluate_subset_and_label_mapping(models, image_folder, tmp_path, capsys):
    subset = tmp_path / "subset.txt"
    subset.write_text("0\n3\n")
    code, out, err = run(capsys, "evaluate", "--model", models["pixel_class"], "--data", image_folder,
                         "--labels", "cat,dog", "--subset", subset, "--out", tmp_path / "r", "--timesteps", "2",
                         "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--labels", "cat,,dog"], "empty label"),
    (["--labels", "cat,dog,cat"], "duplicate label"),
    (["--template", "a photo of a cat"], "no '{}'"),
    (["--preset", "mnist-2"], "unknown preset"),
    (["--labels-file", "/no/such/file"], "labels file not found"),
    (["--strategy", "staged", "--n-samples", "5"], "needs both"),
    (["--strategy", "staged", "--n-samples", "2", "4", "--to-keep", "1", "1", "--timesteps", "3"],
     "--strategy staged does not use --timesteps (exhaustive)"),
    (["--strategy", "elimination", "--timesteps", "3"], "--strategy elimination does not use --timesteps (exhaustive)"),
    (["--top-k", "0"], "must be at least 1"),
    (["--top-k", "-3"], "must be at least 1"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_user_mistakes_are_one_line_errors(models, image_files, capsys, extra, message):
    try:
        code, out, err = run(capsys, "classify", image_files[0], "--model", models["sd"], *extra)
    except SystemExit as exited:  # argparse's own checks exit from parse_args
        code, err = exited.code, capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_paths_and_models_are_one_line_errors(models, image_files, tmp_path, capsys):
    not_image = tmp_path / "fake.png"
    not_image.write_text("this is not a png")
    cases = [
        (["classify", tmp_path / "missing.png", "--model", models["sd"]], "image not found"),
        (["classify", not_image, "--model", models["sd"]], "cannot read image"),
        (["classify", image_files[0], "--model", "no-such-model"], "unknown model"),
        (["classify", image_files[0], "--model", tmp_path], "no model_index.json"),
        (["evaluate", "--model", models["sd"], "--data", tmp_path / "nope", "--out", tmp_path / "o"], "not found"),
    ]
    for argv, message in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_labels_file_with_bom_and_blank_lines(models, image_files, tmp_path, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_bytes("\ufeffcat\n\n dog \n".encode())
    code, out, err = run(capsys, "classify", image_files[0], "--model", models["pixel_text"], "--labels-file", labels,
                         "--timesteps", "2", "--json")
    assert code == 0, err
    assert {r["label"] for r in json.loads(out)["ranking"]} == {"cat", "dog"}


def test_every_command_and_option_has_help():
    """Every subcommand has a description, and every option of it help text that --help shows."""
    import argparse

    from diffusion_classifier.cli import COMMANDS, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        shown = sub.format_help()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            for option in action.option_strings:
                assert option in shown, f"{name} --help does not show {option}"
    out = subprocess.run([sys.executable, "-m", "diffusion_classifier", "evaluate", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--task" in out and "--preset" in out


def test_resuming_a_run_with_other_weights_is_refused(models, image_folder, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = shutil.copytree(models["pixel_class"], tmp_path / "model")
    args = ["evaluate", "--model", model, "--data", image_folder, "--out", tmp_path / "run", "--timesteps", "2",
            "--quiet", "--limit", "2"]
    code, _, err = run(capsys, *args)
    assert code == 0, err
    weights = next((model / "unet").glob("*.safetensors"))
    state = load_file(weights)
    save_file({k: v + 0.01 for k, v in state.items()}, weights)  # "retrained" in place
    code, _, err = run(capsys, *args)
    assert code != 0 and "another configuration" in err and "model_weights_sha256" in err


def test_evaluate_reuses_a_smaller_runs_rows_and_they_equal_fresh_ones(models, image_folder, tmp_path, capsys):
    from diffusion_classifier.store import ResultsStore

    def matrices(run_dir):
        store = ResultsStore(run_dir)
        try:
            return {image_id: m for image_id, (m, _) in store.error_matrices_by_id().items()}
        finally:
            store.close()

    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    small.write_text("1\n3\n")
    large.write_text("0\n1\n2\n3\n")
    common = ["evaluate", "--model", models["pixel_class"], "--data", image_folder, "--labels", "cat,dog",
              "--timesteps", "3", "--quiet"]
    assert run(capsys, *common, "--subset", small, "--out", tmp_path / "small")[0] == 0
    assert run(capsys, *common, "--subset", large, "--out", tmp_path / "fresh")[0] == 0
    code, out, err = run(capsys, *common, "--subset", large, "--out", tmp_path / "reused",
                         "--reuse", tmp_path / "small")
    assert code == 0, err
    assert "reused 2 image(s)" in out
    fresh, reused = matrices(tmp_path / "fresh"), matrices(tmp_path / "reused")
    assert fresh.keys() == reused.keys() and len(fresh) == 4
    for image_id in fresh:  # equal up to float32 rounding: batches of other images sum in another order
        np.testing.assert_allclose(fresh[image_id], reused[image_id], rtol=1e-5)
    code, _, err = run(capsys, *common[:-3], "--timesteps", "2", "--quiet", "--subset", large,
                       "--out", tmp_path / "other", "--reuse", tmp_path / "small")
    assert code != 0 and "another configuration" in err and "strategy" in err
