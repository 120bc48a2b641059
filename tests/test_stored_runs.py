"""Every stored benchmark run still means what it says: its strategy replayed on its errors gives its
predictions, and the current engine recomputes its errors for a sample of its images."""

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier
from diffusion_classifier.data import fashion_mnist_dir
from diffusion_classifier.errors import UserError
from diffusion_classifier.loading import load_denoiser, resolve_model_dir, weights_fingerprint
from diffusion_classifier.replay import replay
from diffusion_classifier.schedules import NoiseSchedule
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.strategies import strategy_from_description

RUNS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "runs").glob("*/results.sqlite"))


def _read(run: Path):
    with ResultsStore(run.parent) as store:
        return store.config(), store.records(), {idx: (m, ts) for idx, m, ts in store.error_matrices()}


@cache
def _denoiser(model: str):
    return load_denoiser(model)


def test_there_are_stored_runs():
    assert len(RUNS) >= 5


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
    from diffusion_classifier.data import fashion_mnist_arrays

    try:
        model_dir = resolve_model_dir(config["model"])
    except UserError:
        pytest.skip(f"{config['model']} is not on this machine (a local training run)")
    if weights_fingerprint(model_dir) != config["model_weights_sha256"]:
        pytest.skip(f"{config['model']} was re-shipped since this run")
    images, _ = fashion_mnist_arrays(config["split"])
    options = {k: config[k] for k in ("target", "weighting") if config.get(k)}
    clf = DiffusionClassifier(
        _denoiser(config["model"]), labels=config["labels"], prompts=config["prompts"], strategy=strategy,
        loss=config["loss"], aggregate=config["aggregate"], seed=config["seed"],
        interpolation=config["interpolation"], grid=grid, **options)
    sample = [ok[len(ok) // 2]]  # one image of each run (500 NFE): the check is the engine, not the sample
    ids = [int(r["id"].split("/")[1]) for r in sample]
    fresh = clf.classify([images[i] for i in ids])
    for record, result in zip(sample, fresh):
        stored, timesteps = matrices[record["idx"]]
        assert result.timesteps == timesteps
        np.testing.assert_allclose(result.errors, stored, rtol=1e-5)
        assert result.prediction_index == record["prediction"]


@pytest.mark.parametrize("run", WINOGROUND, ids=lambda p: p.parent.name)
def test_a_stored_winoground_run_replays_to_its_scores_and_errors(run):
    """Its stored score matrices follow from its stored errors, and the engine recomputes one example."""
    import json

    from diffusion_classifier.matching import ImageTextMatcher
    from diffusion_classifier.matching_data import load_winoground
    from diffusion_classifier.store import array_from_bytes

    config, _, _ = _read(run)
    with ResultsStore(run.parent) as store:
        rows = store.db.execute("SELECT idx, ranking, errors, timesteps FROM results ORDER BY idx").fetchall()
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
        from diffusion_classifier.pairs import winoground_examples

        example = winoground_examples(*fashion_mnist_arrays("test"), config["examples"], seed=0)[middle]
        images, captions = (example.image_0, example.image_1), (example.caption_0, example.caption_1)
    matcher = ImageTextMatcher(_denoiser(config["model"]), strategy=strategy_from_description(config["strategy"]),
                               loss=config["loss"], seed=config["seed"], with_null=config["with_null"])
    (scored,) = matcher.score_groups([(list(images), list(captions))])
    _, _, blob, timesteps = rows[middle]
    stored = array_from_bytes(blob)
    for i, image in enumerate(scored):
        assert image.timesteps == json.loads(timesteps)[i]
        np.testing.assert_allclose(image.errors, stored[i, :2], rtol=1e-5)
