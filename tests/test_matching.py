"""Image-text matching: one scoring pass gives both directions, scores are paired per image, and the
Winoground / pairs runs store, resume and report like classification runs."""

import json
import sqlite3

import numpy as np
import pytest

from diffusion_classifier import UserError
from diffusion_classifier.cli import main
from diffusion_classifier.engine.strategies import Elimination, Exhaustive
from diffusion_classifier.tasks.matching.matcher import ImageTextMatcher
from diffusion_classifier.tasks.matching.metrics import pairs_accuracy, winoground_scores

from .conftest import random_images

TEXTS = ["a red cat", "a dog on grass", "two birds", "a cat on the left of a dog"]


@pytest.mark.parametrize("family", ["sd", "pixel_text"])
def test_the_matrix_equals_scoring_each_pair_alone(models, family):
    matcher = ImageTextMatcher.from_pretrained(models[family], strategy=Exhaustive(3), batch_size=7)
    images = random_images(3, size=16, mode="RGB" if family == "sd" else "L")
    full = matcher.match(images, TEXTS)
    assert full.matrix().shape == (3, 4)
    for i, image in enumerate(images):
        for j, text in enumerate(TEXTS):
            alone = matcher.match([image], [text])
            np.testing.assert_allclose(alone.matrix()[0, 0], full.matrix()[i, j], rtol=1e-5)
            np.testing.assert_allclose(alone.matrix("unconditional")[0, 0], full.matrix("unconditional")[i, j],
                                       rtol=1e-4, atol=1e-6)  # a difference of two errors: float32 rounding
    assert (full.nfe == 3 * (len(TEXTS) + 1)).all()  # every text and the empty prompt at 3 timesteps


def test_the_null_term_uses_the_same_pairs_and_leaves_caption_rankings_alone(models):
    matcher = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Exhaustive(4))
    matching = matcher.match(random_images(3, size=8, mode="L"), TEXTS)
    offset = matching.matrix("unconditional") - matching.matrix("none")  # = mean null error, per image
    np.testing.assert_allclose(offset, offset[:, :1].repeat(len(TEXTS), axis=1), rtol=1e-6)
    for scored in matching.images:
        np.testing.assert_allclose(offset[matching.images.index(scored), 0], scored.null_errors.mean(), rtol=1e-6)
    raw = [[t for t, _ in r] for r in matching.by_image("none")]
    assert raw == [[t for t, _ in r] for r in matching.by_image("unconditional")]
    assert len(matching.by_text()) == len(TEXTS) and len(matching.by_text()[0]) == 3


def test_same_seed_same_scores_and_elimination_reports_its_nfe(models):
    images = random_images(2, size=8, mode="L")
    a = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Exhaustive(3), seed=1).match(images, TEXTS)
    b = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Exhaustive(3), seed=1).match(images, TEXTS)
    np.testing.assert_array_equal(a.matrix(), b.matrix())
    c = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Exhaustive(3), seed=2).match(images, TEXTS)
    assert not np.allclose(a.matrix(), c.matrix())
    elim = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Elimination(0.3, max_timesteps=40))
    result = elim.match(images, TEXTS)
    for scored in result.images:
        evaluated = np.isfinite(scored.errors).sum()
        assert scored.nfe == evaluated + np.isfinite(scored.null_errors).sum()
        assert np.isfinite(scored.null_errors).all()


def test_matching_refuses_class_models_and_bad_texts(models):
    with pytest.raises(UserError, match="text-conditioned"):
        ImageTextMatcher.from_pretrained(models["pixel_class"])
    matcher = ImageTextMatcher.from_pretrained(models["pixel_text"], strategy=Exhaustive(2))
    for texts in ([], ["a", ""], ["a", "a"]):
        with pytest.raises(UserError):
            matcher.match(random_images(1, size=8, mode="L"), texts)


def test_winoground_scores_on_constructed_matrices():
    s = np.array([
        [[2, 1], [0, 3]],   # text ok (2>1, 3>0); image ok (2>0, 3>1): group
        [[2, 1], [3, 4]],   # text ok (2>1, 4>3); image: 2>3 fails
        [[1, 1], [0, 2]],   # a tie: text fails (1 > 1 is false); image ok (1>0, 2>1)
        [[0, 1], [1, 0]],   # everything wrong
    ], dtype=float)
    result = winoground_scores(s, tags=["a", "a", "b", "b"])
    assert result["text_score"] == 0.5 and result["image_score"] == 0.5 and result["group_score"] == 0.25
    assert result["examples"] == 4 and result["group_score_stderr"] == pytest.approx(np.sqrt(0.25 * 0.75 / 4))
    assert result["by_tag"]["a"]["text_score"] == 1.0 and result["by_tag"]["b"]["image_score"] == 0.5
    assert result["by_tag"]["b"]["group_score"] == 0.0
    other = s.copy()
    other[1] = [[5, 1], [0, 6]]  # image scores from another normalisation: example 1 now passes the image test
    assert winoground_scores(s, other)["image_score"] == 0.75


def test_pairs_accuracy_counts_a_tie_as_a_miss():
    assert pairs_accuracy(np.array([1.0, 2, 3]), np.array([0.0, 2, 4]))["accuracy"] == pytest.approx(1 / 3)


@pytest.fixture
def winoground_set(tmp_path):
    root = tmp_path / "wino"
    (root / "img").mkdir(parents=True)
    lines = []
    for k, img in enumerate(random_images(6, size=8, mode="L", seed=5)):
        img.save(root / "img" / f"{k}.png")
    for e in range(3):
        lines.append(json.dumps({"image_0": f"img/{2 * e}.png", "image_1": f"img/{2 * e + 1}.png",
                                 "caption_0": f"a cat left of a dog {e}", "caption_1": f"a dog left of a cat {e}",
                                 "tag": "even" if e % 2 == 0 else "odd"}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def _wino(models, data, out, *extra):
    return ["evaluate", "--task", "winoground", "--data", str(data), "--model", str(models["pixel_text"]),
            "--out", str(out), "--timesteps", "3", "--quiet", "--json", *extra]


def test_winoground_run_reports_stores_and_resumes(models, winoground_set, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_wino(models, winoground_set, out)) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("text_score", "image_score", "group_score", "examples", "nfe_per_example"):
        assert key in metrics
    assert metrics["examples"] == 3 and metrics["nfe_per_example"] == 2 * 3 * 3  # 2 images x (2 captions + null)
    assert set(metrics["by_tag"]) == {"even", "odd"} and metrics["image_normalize"] == "unconditional"
    db = sqlite3.connect(out / "results.sqlite")
    before = dict(db.execute("SELECT idx, ranking FROM results"))
    with db:
        db.execute("DELETE FROM results WHERE idx >= 1")  # as if killed after the first example
    db.close()
    assert main(_wino(models, winoground_set, out)) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["examples_this_run"] == 2
    db = sqlite3.connect(out / "results.sqlite")
    after = dict(db.execute("SELECT idx, ranking FROM results"))
    db.close()
    for idx in before:
        np.testing.assert_allclose(json.loads(after[idx])["raw"], json.loads(before[idx])["raw"], rtol=1e-5)
    for key, value in metrics.items():
        if key not in ("examples_this_run", "by_tag", "image_normalize"):
            assert resumed[key] == pytest.approx(value), key
    assert resumed["by_tag"] == metrics["by_tag"]
    assert main(_wino(models, winoground_set, out, "--seed", "3")) == 2  # another setting: refused


def test_winoground_without_normalisation_skips_the_null(models, winoground_set, tmp_path, capsys):
    assert main(_wino(models, winoground_set, tmp_path / "run", "--normalize", "none")) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["image_normalize"] == "none" and metrics["nfe_per_example"] == 2 * 2 * 3


def test_pairs_task(models, tmp_path, capsys):
    for k, img in enumerate(random_images(2, size=8, mode="L")):
        img.save(tmp_path / f"{k}.png")
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"image": f"{k}.png", "true_caption": "a cat", "false_caption": "a dog"}) + "\n" for k in range(2)))
    assert main(["evaluate", "--task", "pairs", "--data", str(tmp_path / "pairs.jsonl"), "--model",
                 str(models["pixel_text"]), "--out", str(tmp_path / "run"), "--timesteps", "3", "--quiet",
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "examples", "nfe_per_example"} <= set(metrics)
    assert metrics["examples"] == 2 and metrics["nfe_per_example"] == 2 * 3  # no null needed for one image
    assert main(["report", str(tmp_path / "run"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == metrics["accuracy"] and report["task"] == "pairs"
    assert [h["margin"] > 0 for h in report["hardest"]].count(True) == round(metrics["accuracy"] * 2)


def test_report_and_calibrate_read_a_winoground_run(models, tmp_path, capsys):
    """`report` and `calibrate` take an image-text run as they take a classification run: the report's scores are
    the run's metrics (re-scored from the stored errors over a timestep range), its hardest examples are the
    ones furthest from passing, and the temperature is fitted on each image's choice among its captions."""
    root = tmp_path / "wino"
    (root / "img").mkdir(parents=True)
    for k, img in enumerate(random_images(40, size=8, mode="L", seed=9)):
        img.save(root / "img" / f"{k}.png")
    (root / "manifest.jsonl").write_text("".join(json.dumps(
        {"image_0": f"img/{2 * e}.png", "image_1": f"img/{2 * e + 1}.png", "caption_0": f"a cat left of a dog {e}",
         "caption_1": f"a dog left of a cat {e}", "tag": "even" if e % 2 == 0 else "odd"}) + "\n" for e in range(20)))
    out = tmp_path / "run"
    assert main(_wino(models, root / "manifest.jsonl", out)) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["report", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("text_score", "image_score", "group_score", "text_score_stderr", "group_score_stderr"):
        assert report[key] == pytest.approx(metrics[key]), key
    assert report["by_tag"] == metrics["by_tag"] and (out / "report" / "report.json").is_file()
    db = sqlite3.connect(out / "results.sqlite")
    group_passes = dict(db.execute("SELECT id, correct FROM results"))
    db.close()
    margins = [h["margin"] for h in report["hardest"]]
    assert len(margins) == 10 and margins == sorted(margins)
    assert all((h["margin"] > 0) == bool(group_passes[h["id"]]) for h in report["hardest"])
    # every stored timestep in range: the re-scored report is the stored one
    assert main(["report", str(out), "--json", "--t-max", "999"]) == 0
    rescored = json.loads(capsys.readouterr().out)
    for key in ("text_score", "image_score", "group_score"):
        assert rescored[key] == pytest.approx(report[key]), key
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"text {report['text_score']:.4f} +- {report['text_score_stderr']:.4f}" in printed
    assert "hardest examples" in printed
    assert main(["calibrate", str(out), "--json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["fit_images"] + fitted["held_out_images"] == 40 and fitted["temperature"] > 0  # 2 images each
    assert main(["calibrate", str(out), "--per-timestep"]) == 2
    assert "applies to classification runs" in capsys.readouterr().err
    assert main(["report", str(out), "--aggregate", "mean"]) == 2


def test_manifest_mistakes_are_one_line_errors(models, winoground_set, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cases = {
        "manifest not found": None,
        "missing field 'caption_1'": {"image_0": "a.png", "image_1": "a.png", "caption_0": "x"},
        "image not found": {"image_0": "nope.png", "image_1": "nope.png", "caption_0": "x", "caption_1": "y"},
        "cannot read image": {"image_0": "broken.png", "image_1": "broken.png", "caption_0": "x", "caption_1": "y"},
    }
    for message, record in cases.items():
        data = tmp_path / "missing.jsonl" if record is None else bad
        if record is not None:
            bad.write_text(json.dumps(record) + "\n")
        assert main(_wino(models, data, tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_saved_hugging_face_winoground(models, winoground_set, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    rows = [json.loads(line) for line in winoground_set.read_text().splitlines()]
    table = {key: [r[key] for r in rows] for key in ("caption_0", "caption_1")}
    for key in ("image_0", "image_1"):
        table[key] = [Image.open(winoground_set.parent / r[key]) for r in rows]
    table["collapsed_tag"] = [r["tag"] for r in rows]
    features = datasets.Features({"image_0": datasets.Image(), "image_1": datasets.Image(),
                                  "caption_0": datasets.Value("string"), "caption_1": datasets.Value("string"),
                                  "collapsed_tag": datasets.Value("string")})
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(tmp_path / "hf"))
    assert main(_wino(models, tmp_path / "hf", tmp_path / "run")) == 0
    from_hf = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(_wino(models, winoground_set, tmp_path / "run2")) == 0
    from_manifest = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_hf["by_tag"].keys() == from_manifest["by_tag"].keys()
    for key in ("text_score", "image_score", "group_score"):
        assert from_hf[key] == from_manifest[key]  # same pixels, same noise, same scores


def test_match_command_both_directions(models, tmp_path, capsys):
    paths = []
    for k, img in enumerate(random_images(2, size=8, mode="L")):
        paths.append(str(tmp_path / f"{k}.png"))
        img.save(paths[-1])
    base = ["match", *paths, "--model", str(models["pixel_text"]), "--text", "a cat", "--text", "a dog",
            "--timesteps", "3", "--json"]
    assert main(base) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == paths and rows[0]["normalize"] == "none" and rows[0]["nfe"] == 6
    assert {e["text"] for e in rows[0]["ranking"]} == {"a cat", "a dog"}
    assert main(base + ["--by", "text"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a cat", "a dog"] and rows[0]["normalize"] == "unconditional"
    assert main(["match", paths[0], "--model", str(models["pixel_text"])]) == 2
    assert "at least one text" in capsys.readouterr().err


def test_winoground_under_torchrun_equals_one_process(models, winoground_set, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from .test_runs import _free_port

    assert main(_wino(models, winoground_set, tmp_path / "one")) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "diffusion_classifier", *_wino(models, winoground_set, tmp_path / "two")]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    two = json.loads(lines[0])
    for key in ("text_score", "image_score", "group_score", "examples", "nfe_per_example"):
        assert two[key] == one[key]
