"""Elimination strategy and probability calibration."""

import json
import shutil

import numpy as np
import pytest

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, UserError
from diffusion_classifier.adapters.schedules import NoiseSchedule
from diffusion_classifier.cli import main
from diffusion_classifier.engine.probabilities import (
    expected_calibration_error,
    relative_scores,
    softmax_of_errors,
    weighted_probabilities,
)
from diffusion_classifier.engine.strategies import (
    ScoreTable,
    class_tree_indices,
    low_discrepancy_order,
)
from diffusion_classifier.tasks.calibration import fit_temperature, fit_timestep_weights

from .conftest import image_folder, random_images


def run_synthetic(strategy, class_means, noise_sd=0.02, seed=0, n_prompts=1) -> ScoreTable:
    """Drive a strategy with synthetic errors: a shared, strongly t-dependent base curve (as real
    diffusion errors have) plus a per-class offset plus independent noise per (class, t)."""
    rng = np.random.default_rng(seed)
    table = ScoreTable(len(class_means), n_prompts)
    for round_ in strategy.rounds(table, NoiseSchedule(1000), "min"):
        for t in round_.timesteps:
            col = table.column(t)
            base = 0.05 + 0.8 * (1 - t / 1000) ** 4  # shared by every class at this (t, eps)
            shared_noise = rng.normal(0, 0.05)  # the paired part: same eps for every class
            for c in round_.classes:
                values = base + shared_noise + class_means[c] + rng.normal(0, noise_sd, n_prompts)
                table.record(c, slice(None), col, values)
    return table


def test_low_discrepancy_prefixes_cover_the_grid_evenly():
    order = low_discrepancy_order(100)
    assert sorted(order) == list(range(100))
    for k in (4, 8, 16, 32):
        prefix = np.sort(order[:k])
        assert np.diff(prefix).max() <= 2 * 100 / k  # no big holes in any prefix


@pytest.mark.parametrize("error_rate", [0.05, 0.2])
def test_elimination_rarely_drops_the_true_best(error_rate):
    means = np.array([0.0, 0.004, 0.006, 0.01, 0.02, 0.03, 0.05, 0.05, 0.08, 0.1])  # class 0 is best
    drops = 0
    for seed in range(200):
        table = run_synthetic(Elimination(error_rate=error_rate, max_timesteps=200), means, seed=seed)
        if table.ranking()[0] != 0 and table.evidence.get(0, {}).get("eliminated"):
            drops += 1
    assert drops <= error_rate * 200


def test_elimination_stops_early_when_gaps_are_clear():
    means = np.array([0.0] + [0.05] * 9)
    table = run_synthetic(Elimination(error_rate=0.05, max_timesteps=100), means, noise_sd=0.005)
    assert table.ranking()[0] == 0
    assert table.nfe < 0.25 * 10 * 100  # far less than all classes at all 100 timesteps
    assert all(v["eliminated"] for c, v in table.evidence.items() if c != 0)


@pytest.mark.parametrize("max_nfe", [10, 37, 120])
def test_elimination_respects_the_budget(max_nfe):
    means = np.linspace(0, 0.001, 10)  # nearly tied: would run long without a budget
    for seed in range(5):
        table = run_synthetic(Elimination(max_nfe=max_nfe), means, seed=seed)
        assert table.nfe <= max_nfe


def test_elimination_with_a_thousand_classes_and_a_shortlist():
    means = np.concatenate([[0.0], np.random.default_rng(1).uniform(0.02, 0.2, 999)])
    table = run_synthetic(Elimination(max_timesteps=100, shortlist=20), means, noise_sd=0.01)
    assert table.ranking()[0] == 0
    assert table.nfe < 1000 * 8 + 20 * 100


def test_class_tree_descends_one_level_per_round_and_saves_evaluations():
    # 40 classes in 8 groups of 5; class 0 is best, its siblings 1-4 close, the other groups too close to
    # be ruled out by the statistics after one round
    means = np.concatenate([[0.0, 0.004, 0.006, 0.008, 0.01], np.random.default_rng(2).uniform(0.012, 0.03, 35)])
    tree = [list(range(g * 5, g * 5 + 5)) for g in range(8)]
    plain = run_synthetic(Elimination(max_timesteps=100, min_timesteps=8), means, noise_sd=0.01)
    grouped = run_synthetic(Elimination(max_timesteps=100, min_timesteps=8, class_tree=tree, keep_groups=1),
                            means, noise_sd=0.01)
    assert grouped.ranking()[0] == plain.ranking()[0] == 0
    assert grouped.nfe < plain.nfe
    dropped_by_tree = {c for c, v in grouped.evidence.items() if v.get("by") == "class tree"}
    assert dropped_by_tree == set(range(5, 40))  # whole groups go after the first round; siblings stay


def test_class_tree_by_name_with_unlisted_classes_and_mistakes():
    labels = ["cat", "dog", "car", "bus", "tree"]
    tree = {"animals": ["cat", "dog"], "vehicles": {"road": ["car", "bus"]}}
    assert class_tree_indices(tree, labels) == [[0, 1], [[2, 3]], 4]  # "tree" is a group of its own
    for bad, message in (({"a": ["cat", "cow"]}, "not one of"), (["cat", ["cat"]], "twice"),
                         ({"a": []}, "no members"), ("cat", "object or list")):
        with pytest.raises(UserError, match=message):
            class_tree_indices(bad, labels)
    with pytest.raises(UserError, match="not both"):
        Elimination(shortlist=3, class_tree=tree)


def test_class_tree_from_the_cli(models, tmp_path, capsys):
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps({"tops": ["T-shirt/top", "Pullover", "Coat", "Shirt", "Dress"],
                                "footwear": ["Sandal", "Sneaker", "Ankle boot"]}))
    image = tmp_path / "x.png"
    random_images(1, size=28, mode="L")[0].save(image)
    args = ["classify", str(image), "--model", "fashion-mnist-class", "--strategy", "elimination",
            "--max-timesteps", "20", "--class-tree", str(tree), "--keep-groups", "1", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nfe"] < 10 * 20
    tree.write_text("{not json")
    assert main(args) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(args[:-5] + ["--class-tree", str(tmp_path / "missing.json")]) == 2


def test_elimination_on_real_models_is_deterministic(models):
    imgs = random_images(2)
    for name, kwargs in (("dit", {}), ("sd", {"labels": ["cat", "dog", "bird"]})):
        a, b = (DiffusionClassifier.from_pretrained(models[name], strategy=Elimination(max_nfe=60, max_timesteps=20),
                                                    **kwargs).classify(imgs) for _ in range(2))
        for x, y in zip(a, b):
            assert x.prediction == y.prediction and x.nfe == y.nfe <= 60
            np.testing.assert_array_equal(x.errors, y.errors)
            assert "evidence" in x.extra


def test_pruned_classes_get_probabilities_from_their_own_timesteps():
    errors = np.full((3, 1, 4), np.nan)
    errors[0, 0] = [0.9, 0.5, 0.3, 0.1]  # leader, evaluated at all four timesteps
    errors[1, 0, :2] = [1.0, 0.6]  # pruned after two: 0.1 worse than the leader there
    errors[2, 0] = [0.95, 0.55, 0.35, 0.15]  # 0.05 worse everywhere
    relative = relative_scores(errors, 0)
    np.testing.assert_allclose(relative, [0.0, 0.1, 0.05])
    probs = softmax_of_errors(relative[None], 0.05)[0]
    assert probs[0] > probs[2] > probs[1]


def test_calibration_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    errors = rng.normal(0, 0.03, (6000, 10))
    true_t = 0.02
    probs = softmax_of_errors(errors, true_t)
    labels = np.array([rng.choice(10, p=p) for p in probs])
    fitted = fit_temperature(errors, labels)
    assert fitted == pytest.approx(true_t, rel=0.1)
    assert expected_calibration_error(softmax_of_errors(errors, fitted), labels) < 0.03


def test_per_timestep_weights_recover_known_weights():
    rng = np.random.default_rng(0)
    gaps = rng.normal(0, 1, (4000, 5, 3))
    true_w = np.array([2.0, 0.2, 1.0])  # timestep 0 informative, timestep 1 nearly noise
    labels = np.array([rng.choice(5, p=p) for p in weighted_probabilities(gaps, true_w)])
    fitted = fit_timestep_weights(gaps, labels)
    np.testing.assert_allclose(fitted, true_w, atol=0.15)


def test_calibrate_command_on_a_stored_run(models, tmp_path, capsys):
    data = image_folder(tmp_path / "data", ["cat", "dog"], 20)
    run = tmp_path / "run"
    assert main(["evaluate", "--model", str(models["pixel_class"]), "--data", str(data), "--labels", "cat,dog",
                 "--out", str(run), "--timesteps", "4", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["calibrate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["temperature"] > 0 and result["fit_images"] + result["held_out_images"] == 40
    assert {"nll", "ece"} <= set(result["after"])
    image = data / "cat" / "0.png"
    assert main(["classify", str(image), "--model", str(models["pixel_class"]), "--labels", "cat,dog",
                 "--timesteps", "4", "--calibration", str(run), "--json"]) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert sum(r["probability"] for r in ranking) == pytest.approx(1)

    assert main(["calibrate", str(run), "--per-timestep", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["timesteps"]) == len(result["timestep_weights"]) == 4 and "after_per_timestep" in result
    classify = ["classify", str(image), "--model", str(models["pixel_class"]), "--labels", "cat,dog",
                "--calibration", str(run), "--json"]
    assert main(classify + ["--timesteps", "4"]) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert sum(r["probability"] for r in ranking) == pytest.approx(1)
    assert main(classify + ["--timesteps", "5"]) == 2  # weights fitted for other timesteps
    assert "fitted at timesteps" in capsys.readouterr().err


def test_elimination_options_are_validated(models, tmp_path, capsys):
    with pytest.raises(UserError):
        Elimination(error_rate=0)
    image = tmp_path / "x.png"
    random_images(1, size=8, mode="L")[0].save(image)
    assert main(["classify", str(image), "--model", str(models["pixel_class"]), "--strategy", "elimination",
                 "--n-samples", "5"]) == 2
    assert "does not use --n-samples" in capsys.readouterr().err


def test_exhaustive_probabilities_equal_plain_softmax(models):
    clf = DiffusionClassifier.from_pretrained(models["dit"], strategy=Exhaustive(3), temperature=0.01)
    results = clf.classify(random_images(2))
    plain = softmax_of_errors(np.stack([r.mean_errors for r in results]), 0.01)
    np.testing.assert_allclose(clf.probabilities(results), plain, rtol=1e-6)


def test_a_temperature_stored_with_the_model_is_the_default(models, tmp_path, capsys):
    model = tmp_path / "calibrated"
    shutil.copytree(models["pixel_class"], model)
    index = json.loads((model / "model_index.json").read_text())
    index["calibration"] = {"temperature": 0.05, "timesteps": 4}
    (model / "model_index.json").write_text(json.dumps(index))
    assert DiffusionClassifier.from_pretrained(model).temperature == 0.05
    assert DiffusionClassifier.from_pretrained(model, temperature=2.0).temperature == 2.0
    assert DiffusionClassifier.from_pretrained(models["pixel_class"]).temperature == 1.0

    image = tmp_path / "x.png"
    random_images(1, size=8, mode="L")[0].save(image)
    probabilities = []
    for args in (["--model", str(model)], ["--model", str(models["pixel_class"]), "--temperature", "0.05"],
                 ["--model", str(models["pixel_class"])]):
        assert main(["classify", str(image), "--timesteps", "4", "--json", *args]) == 0
        probabilities.append([r["probability"] for r in json.loads(capsys.readouterr().out)["ranking"]])
    assert probabilities[0] == pytest.approx(probabilities[1])
    assert max(probabilities[0]) > max(probabilities[2])  # a lower temperature is sharper
