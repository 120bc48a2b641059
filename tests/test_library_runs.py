"""Evaluation runs from Python (runs.py): the same runs as the CLI's, resumable without it; the matcher keeps no
state between calls; Fashion-MNIST is a preset like the paper's datasets."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier import EvaluationRun, Exhaustive, ImageTextMatcher, UserError, preset, run_evaluation
from diffusion_classifier.adapters.loading import load_denoiser
from diffusion_classifier.cli import main
from diffusion_classifier.data import fashion_mnist, fashion_mnist_dir
from diffusion_classifier.store import ResultsStore

from .conftest import CLASSES, random_images
from .conftest import image_folder as make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _has_fashion_mnist() -> bool:
    try:
        fashion_mnist_dir()
        return True
    except UserError:
        return False


@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
def test_the_usage_snippet_starts_interrupts_and_resumes_a_run(tmp_path, capsys):
    text = (ROOT / "docs" / "usage.md").read_text()
    snippet = re.search(r"<!-- usage-run-snippet -->\n```python\n(.*?)```", text, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(snippet, "usage.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    partial, metrics = namespace["partial"], namespace["metrics"]
    assert (partial["images"], partial["complete"]) == (8, False)
    assert (metrics["images"], metrics["images_this_run"], metrics["complete"]) == (24, 16, True)
    assert metrics["accuracy"] > 0.5  # the shipped class model at 10 timesteps is right far more often than chance
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "8 False" and printed[1].startswith("16 True 0.9")


def test_a_python_run_is_the_cli_run_and_resumes_it(models, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", CLASSES, per_class=2)
    out = tmp_path / "run"
    run = EvaluationRun(model=models["pixel_class"], data=folder, out=out, device="cpu",
                        scoring={"strategy": Exhaustive(3), "images_per_batch": 3})
    first = run_evaluation(run, progress=False, max_new=5)
    assert first["images"] == 5 and not first["complete"]
    # the CLI, given the same settings, takes the run over and scores only the three images left
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(folder), "--out", str(out),
                 "--timesteps", "3", "--device", "cpu", "--quiet", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["images_this_run"] == 3 and cli["complete"] and cli["images"] == 8
    # and a fresh Python run from scratch stores the same predictions
    again = run_evaluation(EvaluationRun(model=models["pixel_class"], data=folder, out=tmp_path / "fresh",
                                         device="cpu", scoring={"strategy": Exhaustive(3)}), progress=False)
    assert again["accuracy"] == cli["accuracy"]
    with ResultsStore(out) as a, ResultsStore(tmp_path / "fresh") as b:
        assert [r["prediction"] for r in a.records()] == [r["prediction"] for r in b.records()]
        assert a.config() == b.config()


def test_a_run_starts_again_from_its_run_file(models, tmp_path, capsys):
    """Every run writes RUN_DIR/run.json; `evaluate --run-file` (and EvaluationRun.load) start it again with
    every setting, a stored strategy included, and nothing else may be given with it."""
    from diffusion_classifier import Elimination, ScoringConfig

    folder = make_image_folder(tmp_path / "data", CLASSES, per_class=2)
    out = tmp_path / "run"
    run = EvaluationRun(model=models["pixel_class"], data=folder, out=out, device="cpu",
                        scoring={"strategy": Elimination(0.1, max_timesteps=12), "seed": 4})
    first = run_evaluation(run, progress=False, max_new=3)
    loaded = EvaluationRun.load(out / "run.json")
    assert loaded.to_dict() == run.to_dict() and loaded.scoring_config().strategy.describe()["error_rate"] == 0.1
    assert main(["evaluate", "--run-file", str(out / "run.json"), "--quiet", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (first["images"], resumed["images_this_run"], resumed["complete"]) == (3, 5, True)
    with ResultsStore(out) as store:  # the stored configuration rebuilds the scoring settings it was made by
        assert ScoringConfig.from_description(store.config()).describe() == run.scoring_config().describe()
    assert main(["evaluate", "--run-file", str(out / "run.json"), "--limit", "2", "--seed", "1"]) == 2
    assert "leave out --limit, --seed" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(folder), "--out", str(out)]) == 2
    assert "evaluate needs --model" in capsys.readouterr().err


def test_a_run_with_other_scoring_settings_is_refused(models, tmp_path):
    folder = make_image_folder(tmp_path / "data", CLASSES, per_class=1)
    spec = dict(model=models["pixel_class"], data=folder, out=tmp_path / "run", device="cpu")
    run_evaluation(EvaluationRun(**spec, scoring={"strategy": Exhaustive(2)}), progress=False)
    with pytest.raises(UserError, match="another configuration"):
        run_evaluation(EvaluationRun(**spec, scoring={"strategy": Exhaustive(3)}), progress=False)


def test_pairs_runs_batch_by_images(models, tmp_path, monkeypatch):
    """A pairs example is one image, so images_per_batch of them share a pass (winoground: half as many)."""
    from diffusion_classifier.tasks.caption_pairs import CaptionPairsTask

    batches = []
    real = CaptionPairsTask.score

    def spy(self, matcher, items, batch, prepared):
        batches.append(len(batch))
        return real(self, matcher, items, batch, prepared)

    monkeypatch.setattr(CaptionPairsTask, "score", spy)
    for k, img in enumerate(random_images(7, size=8, mode="L")):
        img.save(tmp_path / f"{k}.png")
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"image": f"{k}.png", "true_caption": "a cat", "false_caption": "a dog"}) + "\n" for k in range(7)))
    run_evaluation(EvaluationRun(model=models["pixel_text"], data=tmp_path / "pairs.jsonl", out=tmp_path / "run",
                                 task="pairs", device="cpu",
                                 scoring={"strategy": Exhaustive(2), "images_per_batch": 6}), progress=False)
    assert batches == [6, 1]


@pytest.mark.parametrize("option, value", [("labels", ["a", "b"]), ("preset", "cifar10"), ("subset", [0]),
                                           ("temperature", 0.5)])
def test_classification_settings_are_refused_for_matching_tasks(tmp_path, option, value):
    with pytest.raises(UserError, match="applies to classification"):
        EvaluationRun(model="m", data="d.jsonl", out=tmp_path, task="winoground", **{option: value})


def test_the_matcher_keeps_no_state_between_calls_and_a_bounded_cache(models):
    denoiser = load_denoiser(models["pixel_text"])
    images = random_images(2, size=8, mode="L")
    texts_a, texts_b = ["a cat", "a dog", "two birds"], ["a fish", "a cat on a mat"]
    shared = ImageTextMatcher(denoiser, strategy=Exhaustive(2), cache_size=2)
    first = shared.match(images, texts_a).matrix()
    second = shared.match(images, texts_b).matrix()
    again = shared.match(images, texts_a).matrix()
    assert shared.engine.conditions is None and len(shared._embedded) <= 2
    fresh = ImageTextMatcher(denoiser, strategy=Exhaustive(2))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh.match(images, texts_a).matrix())
    np.testing.assert_array_equal(second, ImageTextMatcher(denoiser, strategy=Exhaustive(2)).match(
        images, texts_b).matrix())
    row_bytes = sum(v.numel() * v.element_size() for v in next(iter(shared._embedded.values())).values())
    by_bytes = ImageTextMatcher(denoiser, strategy=Exhaustive(2), cache_bytes=2 * row_bytes)
    np.testing.assert_array_equal(by_bytes.match(images, texts_a).matrix(), first)
    assert len(by_bytes._embedded) == 2 and by_bytes._cached_bytes == 2 * row_bytes


@pytest.mark.skipif(not _has_fashion_mnist(), reason="Fashion-MNIST not installed (make data)")
def test_fashion_mnist_is_a_preset_like_the_papers_datasets():
    chosen = preset("fashion-mnist")
    assert list(chosen.classes) == fashion_mnist("test").class_names
    labels, prompts = chosen.candidates()
    assert labels[0] == "T-shirt/top" and prompts[0] == ["a photo of a t-shirt."] and prompts[1] == [
        "a photo of a trousers."]
    relabelled = chosen.relabel(fashion_mnist("test"))
    assert relabelled.class_names == list(chosen.classes) and (relabelled.labels[:50] ==
                                                               fashion_mnist("test").labels[:50]).all()
