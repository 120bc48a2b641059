"""Every stored benchmark run still means what it says: its strategy replayed on its errors gives its
predictions, and the current engine recomputes its errors for a sample of its images."""

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier
from diffusion_classifier.adapters.loading import load_denoiser, resolve_model_dir, weights_fingerprint
from diffusion_classifier.adapters.schedules import NoiseSchedule
from diffusion_classifier.data import fashion_mnist_dir
from diffusion_classifier.engine.config import ScoringConfig
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.strategies import strategy_from_description
from diffusion_classifier.errors import UserError
from diffusion_classifier.store import ResultsStore

RUNS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "runs").glob("*/results.sqlite"))


def _read(run: Path):
    with ResultsStore(run.parent) as store:
        return store.config(), store.records(), {idx: (m, ts) for idx, m, ts in store.error_matrices()}


def _images_of(config: dict) -> dict:
    """{image id: image} of a stored run's data: Fashion-MNIST's split, or a manifest the benchmarks write under
    runs/ (not committed: skipped where it has not been regenerated)."""
    from diffusion_classifier.data import fashion_mnist_arrays, load_dataset

    if config["data"] == "fashion-mnist":
        images, _ = fashion_mnist_arrays(config["split"])
        return {f"{config['split']}/{i}": image for i, image in enumerate(images)}
    path = Path(__file__).resolve().parents[1] / config["data"]
    if not path.is_file():
        pytest.skip(f"{config['data']} is written by the benchmark that made this run; not on this machine")
    dataset = load_dataset(str(path))
    return dict(zip(dataset.ids, dataset.items))


@cache
def _denoiser(model: str):
    return load_denoiser(model)


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.parent.name)
def test_a_stored_run_is_named_for_what_it_holds(run):
    """A run directory's name carries its model, the first 10 hex digits of the weights' sha256, its split and
    image (example) count and its grid or timesteps, and they are what its configuration records."""
    import re

    config, records, _ = _read(run)
    name = run.parent.name
    assert Path(config["model"]).name in name
    assert config["model_weights_sha256"][:10] in name
    count = config.get("images", config.get("examples"))
    span = re.search(r"-(?:test|train)(\d+)(?:-(\d+))?-", name)  # a count, or a part of a larger pass: start-stop
    assert span and count == (int(span[2]) - int(span[1]) if span[2] else int(span[1])), (name, count)
    strategy = config["strategy"]
    timesteps = strategy.get("n_timesteps") or len(strategy.get("timesteps", []))
    assert name.endswith((f"grid{timesteps}", f"t{timesteps}")), (name, strategy)
    assert 0 < len(records) <= count


CLASSIFICATION = [r for r in RUNS if _read(r)[0].get("task", "classification") == "classification"]
WINOGROUND = [r for r in RUNS if _read(r)[0].get("task") == "winoground"]


@pytest.mark.parametrize("run", CLASSIFICATION, ids=lambda p: p.parent.name)
def test_a_stored_run_replays_to_its_predictions_and_errors(run):
    config, records, matrices = _read(run)
    strategy = strategy_from_description(config["strategy"])
    ok = [r for r in records if r["status"] == "ok"]
    grid = config.get("grid") or "even"
    schedule = NoiseSchedule(1000).with_grid(grid)
    aggregate = config["aggregate"]
    replayed = [int(replay(strategy, *matrices[r["idx"]], schedule, aggregate).ranking(aggregate)[0]) for r in ok]
    assert replayed == [r["prediction"] for r in ok]

    try:
        fashion_mnist_dir()
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    images = _images_of(config)
    try:
        model_dir = resolve_model_dir(config["model"])
    except UserError:
        pytest.skip(f"{config['model']} is not on this machine (a local training run)")
    if weights_fingerprint(model_dir) != config["model_weights_sha256"]:
        pytest.skip(f"{config['model']} was re-shipped since this run")
    clf = DiffusionClassifier(_denoiser(config["model"]), labels=config["labels"], prompts=config["prompts"],
                              config=ScoringConfig.from_description(config))
    sample = [ok[len(ok) // 2]]  # one image of each run: the check is the engine, not the sample
    fresh = clf.classify([images[r["id"]] for r in sample])
    for record, result in zip(sample, fresh):
        stored, timesteps = matrices[record["idx"]]
        assert result.timesteps == timesteps
        np.testing.assert_allclose(result.errors, stored, rtol=1e-5)
        assert result.prediction_index == record["prediction"]


@pytest.mark.parametrize("run", WINOGROUND, ids=lambda p: p.parent.name)
def test_a_stored_winoground_run_replays_to_its_scores_and_errors(run):
    """Its stored score matrices follow from its stored errors, and the engine recomputes one example."""
    import json

    from diffusion_classifier.store import array_from_bytes
    from diffusion_classifier.tasks.matching.examples import load_winoground
    from diffusion_classifier.tasks.matching.matcher import ImageTextMatcher

    config, _, _ = _read(run)
    with ResultsStore(run.parent) as store:
        rows = [(row.idx, row.ranking, row.errors, row.timesteps) for row in store.rows()]
    for _, outcome, blob, _ in rows:
        errors, outcome = array_from_bytes(blob), json.loads(outcome)
        np.testing.assert_allclose(outcome["raw"], -np.nanmean(errors[:, :2], axis=-1), rtol=1e-6)
    if weights_fingerprint(resolve_model_dir(config["model"])) != config["model_weights_sha256"]:
        pytest.skip(f"{config['model']} was re-shipped since this run")
    middle = len(rows) // 2
    if Path(config["data"]).exists():
        stored_example = load_winoground(config["data"])[middle]
        images, captions = stored_example.images, stored_example.captions
    else:  # benchmarks/compositional.py's examples, regenerated exactly (they are not committed)
        try:
            fashion_mnist_dir()
        except UserError:
            pytest.skip("Fashion-MNIST is not installed (make data)")
        from diffusion_classifier.data import fashion_mnist_arrays
        from diffusion_classifier.training.pairs import winoground_examples

        example = winoground_examples(*fashion_mnist_arrays("test"), config["examples"], seed=0)[middle]
        images, captions = (example.image_0, example.image_1), (example.caption_0, example.caption_1)
    matcher = ImageTextMatcher(_denoiser(config["model"]), config=ScoringConfig.from_description(config),
                               with_null=config["with_null"])
    (scored,) = matcher.score_groups([(list(images), list(captions))])
    _, _, blob, timesteps = rows[middle]
    stored = array_from_bytes(blob)
    for i, image in enumerate(scored):
        assert image.timesteps == json.loads(timesteps)[i]
        np.testing.assert_allclose(image.errors, stored[i, :2], rtol=1e-5)
