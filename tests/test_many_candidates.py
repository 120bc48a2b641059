"""Elimination's promise with many candidates and few samples, and the first look's shortlist."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from diffusion_classifier.adapters.schedules import as_schedule
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.shortlists import FirstLook, conformal_quantile, fit_first_look
from diffusion_classifier.engine.simulation import dropped_winner_rate, simulated_errors
from diffusion_classifier.engine.strategies import Elimination, _quantile, strategy_from_description
from diffusion_classifier.errors import UserError

GRID = as_schedule(1000).grid(50, 0)


@pytest.mark.parametrize("n_candidates,n_tied,repeats", [(2, 2, 300), (10, 5, 300), (90, 30, 150), (1000, 100, 25)])
@pytest.mark.parametrize("min_timesteps,round_size", [(3, 1), (8, 4)])
def test_elimination_drops_the_exhaustive_winner_at_most_at_its_error_rate(n_candidates, n_tied, repeats,
                                                                         min_timesteps, round_size):
    rate = 0.1
    strategy = Elimination(rate, max_timesteps=len(GRID), min_timesteps=min_timesteps, round_size=round_size)
    dropped, cost = dropped_winner_rate(strategy, n_candidates, n_tied, repeats, seed=n_candidates + min_timesteps)
    assert dropped <= rate + 3 * np.sqrt(rate * (1 - rate) / repeats)
    assert cost < 1  # it does eliminate: the check is not passed by never deciding


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_the_gap_bound_covers_at_its_level_with_few_samples(n):
    """One look, one comparison: a zero-mean normal gap is declared positive at most at the stated level (the
    normal quantile the bound used before exceeds it several times over with so few samples)."""
    rng = np.random.default_rng(n)
    level = 0.01
    gaps = rng.standard_normal((200_000, n))
    statistic = gaps.mean(axis=1) / (gaps.std(axis=1, ddof=1) / np.sqrt(n))
    t_rate = (statistic > _quantile(1 - level, n - 1)).mean()
    normal_rate = (statistic > _quantile(1 - level, None)).mean()
    assert t_rate <= level * 1.1
    assert normal_rate > 1.5 * level  # what the old bound did


def test_a_whole_grid_makes_elimination_exhaustive():
    """With the finite-population correction the bound closes when the grid is seen: candidates whose grid
    mean is worse are dropped then, so the answer is exhaustive's."""
    rng = np.random.default_rng(0)
    errors = simulated_errors(rng, 3, 3)
    table = replay(Elimination(0.05, max_timesteps=len(GRID)), errors, GRID)
    assert table.ranking()[0] == errors[:, 0].mean(axis=1).argmin()


def test_conformal_quantile():
    scores = np.arange(1, 100, dtype=float)  # 99 scores
    assert conformal_quantile(scores, 0.1) == 90.0  # rank ceil(100 * 0.9) = 90
    assert conformal_quantile(scores[:5], 0.1) == float("inf")  # too few to bound 10%


def test_first_look_keeps_the_winner_on_new_images_and_finds_the_informative_timesteps():
    """Class information sits at grid points 20-24 only; the fitted first look picks among those, and its shortlist
    keeps the exhaustive winner on at least 1 - miss_rate of fresh images while dropping most candidates."""
    rng = np.random.default_rng(0)

    def images(n):
        errors = 1.0 + 0.05 * rng.standard_normal((n, 40, len(GRID)))
        truth = rng.integers(0, 40, n)
        errors[np.arange(n), truth, 20:25] -= 0.3
        return errors

    first = fit_first_look(images(400), GRID, n_timesteps=2, miss_rate=0.05)
    assert set(first.timesteps) & set(GRID[20:25])
    fresh = images(400)
    winners = fresh.mean(axis=2).argmin(axis=1)
    shortlisted, agreed, nfe = 0, 0, []
    for errors, winner in zip(fresh, winners):
        table = replay(Elimination(0.05, max_timesteps=len(GRID), first_look=first), errors[:, None, :], GRID)
        shortlisted += table.evidence.get(int(winner), {}).get("by") != "first look"
        agreed += table.ranking()[0] == winner
        nfe.append(table.nfe)
    slack = 3 * np.sqrt(0.1 * 0.9 / len(fresh))
    assert shortlisted / len(fresh) >= 0.95 - slack
    assert agreed / len(fresh) >= 1 - (0.05 + 0.05) - slack  # the promise: first-look miss rate + error rate
    assert np.mean(nfe) < 0.5 * fresh[0].size  # a fraction of exhaustive's cost


def test_first_look_round_trips_through_describe_and_json(tmp_path):
    first = FirstLook((10, 250), 0.02, 0.05, 50, 200, 3.5)
    strategy = Elimination(0.05, max_timesteps=50, first_look=first)
    rebuilt = strategy_from_description(strategy.describe())
    assert rebuilt.first_look == first and rebuilt.bound == "t"
    before = {"name": "elimination", "error_rate": 0.05, "max_nfe": None, "max_timesteps": 50, "round_size": 4,
              "min_timesteps": 8, "shortlist": None, "class_tree": None, "keep_groups": 2}  # stored before bounds
    assert strategy_from_description(before).bound == "normal"
    first.save(tmp_path / "first.json")
    assert FirstLook.load(tmp_path / "first.json") == first
    with pytest.raises(UserError, match="own shortlist"):
        Elimination(first_look=first, shortlist=3)
    with pytest.raises(UserError, match="cannot bound"):
        fit_first_look(np.ones((10, 5, 50)), GRID, miss_rate=0.05)
    with pytest.raises(UserError, match="fitted on a grid of 50 timesteps"):
        Elimination(first_look=first, max_timesteps=100)
    pruned = np.ones((200, 5, 50))
    pruned[0, 1, 3] = np.nan  # a pruned run's unmeasured cell: refused, not a NaN threshold
    with pytest.raises(UserError, match="exhaustive errors"):
        fit_first_look(pruned, GRID, miss_rate=0.05)


def exhaustive_run(models, tmp_path, per_class: int) -> tuple[list[str], Path, Path]:
    """(class names, an image folder of per_class random images each, its exhaustive 8-timestep run)."""
    from diffusion_classifier.cli import main

    from .conftest import image_folder

    names = ["dog", "cat", "bird", "fish", "frog", "horse"]
    data = image_folder(tmp_path / "data", names, per_class, size=20, mode="RGB")
    run_dir = tmp_path / "run"
    assert main(["evaluate", "--model", str(models["pixel_text"]), "--data", str(data), "--out", str(run_dir),
                 "--timesteps", "8", "--quiet"]) == 0
    return names, data, run_dir


def test_calibrate_fits_a_first_look_that_classify_and_evaluate_use(models, tmp_path, capsys):
    from diffusion_classifier.cli import main

    names, data, run_dir = exhaustive_run(models, tmp_path, 2)
    code = main(["calibrate", str(run_dir), "--first-look", "2", "--miss-rate", "0.25", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    first = FirstLook.from_dict(json.loads(out.strip().splitlines()[-1]))
    assert len(first.timesteps) == 2 and first.grid == 8 and first.fitted_on == 12
    image = str(next((data / "dog").iterdir()))
    code = main(["classify", image, "--model", str(models["pixel_text"]), "--labels", ",".join(names),
                 "--strategy", "elimination", "--first-look", str(run_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert len(names) * 2 <= row["nfe"] <= len(names) * 8  # the first look for all, then the shortlist
    code = main(["classify", image, "--model", str(models["pixel_text"]), "--labels", ",".join(names),
                 "--first-look", str(run_dir)])
    assert code != 0 and "does not use --first-look (elimination)" in capsys.readouterr().err
    code = main(["calibrate", str(run_dir), "--first-look", "2", "--miss-rate", "0.01"])
    assert code != 0 and "cannot bound a miss rate" in capsys.readouterr().err


def test_coarse_to_fine_scores_coarse_candidates_then_only_the_classes_they_keep(models):
    from diffusion_classifier import DiffusionClassifier
    from diffusion_classifier.engine.strategies import CoarseToFine, Exhaustive

    from .conftest import random_images

    classes = ["red cat", "red dog", "blue cat", "blue dog", "green cat", "green dog"]
    colour = {"a red thing": classes[0:2], "a blue thing": classes[2:4], "a green thing": classes[4:6]}
    animal = {"a cat": classes[0::2], "a dog": classes[1::2]}
    strategy = CoarseToFine([colour, animal], keep=1, timesteps=2, grid=10, then=Exhaustive(3))
    clf = DiffusionClassifier.from_pretrained(models["pixel_text"], labels=classes, templates=["a photo of {}."],
                                              strategy=strategy)
    result = clf.classify(random_images(1, size=8, mode="L"))[0]
    assert {label for label, _ in result.ranking} == set(classes)  # coarse candidates never ranked
    assert result.errors.shape[0] == len(classes)
    assert result.nfe == 5 * 2 + 1  # five coarse candidates at 2 timesteps, then the one class both families keep
    dropped = {c for c, why in result.extra["evidence"].items() if why["by"] == "coarse-to-fine"}
    assert dropped == set(classes) - {result.prediction}
    assert strategy_from_description(strategy.describe()).describe() == strategy.describe()

    wider = CoarseToFine([colour], keep=2, timesteps=[100, 500], then=Exhaustive(3))
    clf = DiffusionClassifier.from_pretrained(models["pixel_text"], labels=classes, templates=["a photo of {}."],
                                              strategy=wider)
    result = clf.classify(random_images(1, size=8, mode="L"))[0]
    assert result.nfe == 3 * 2 + 4 * 3  # three colours at 2 timesteps, then the four classes of the best two
    with pytest.raises(UserError, match="is not a candidate label"):
        DiffusionClassifier.from_pretrained(models["pixel_text"], labels=classes[:2], templates=["{}"],
                                            strategy=CoarseToFine([colour]))


def test_the_imagenet_preset_carries_its_wordnet_class_tree_and_elimination_descends_it(capsys):
    """Each of the 1,000 classes once, related classes together (tools/imagenet_class_tree.py), and elimination
    with `--class-tree preset` keeps the right class while scoring far fewer than exhaustive on clear errors."""
    from diffusion_classifier import Elimination, preset
    from diffusion_classifier.engine.replay import replay
    from diffusion_classifier.engine.strategies import class_tree_indices

    imagenet = preset("imagenet")
    groups = class_tree_indices(imagenet.class_tree, imagenet.classes)
    top_level_of = {}
    for k, group in enumerate(groups):
        for leaf in (_leaves(group) if isinstance(group, list) else [group]):
            assert leaf not in top_level_of
            top_level_of[leaf] = k
    assert sorted(top_level_of) == list(range(1000)) and 20 <= len(groups) <= 100
    names = list(imagenet.classes)
    assert top_level_of[names.index("Beagle")] == top_level_of[names.index("Basset Hound")]
    assert top_level_of[names.index("Beagle")] != top_level_of[names.index("tench")]

    rng = np.random.default_rng(0)
    grid = list(as_schedule(1000).grid(20, 0))
    truth = names.index("goldfinch")
    errors = 1.0 + 0.02 * rng.standard_normal((1000, 1, len(grid)))
    errors[truth] -= 0.2
    strategy = Elimination(0.05, max_timesteps=20, min_timesteps=2, round_size=2, class_tree=imagenet.class_tree,
                           keep_groups=3).resolve(names)
    table = replay(strategy, errors, grid)
    assert table.ranking()[0] == truth and table.nfe < 1000 * len(grid) / 4
    from diffusion_classifier.cli import main

    image = str(next((Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist").glob("*.png")))
    assert main(["classify", image, "--model", "m", "--strategy", "elimination", "--class-tree", "preset"]) == 2
    assert "--class-tree preset takes the tree of a --preset" in capsys.readouterr().err


def _leaves(node):
    return [x for child in node for x in _leaves(child)] if isinstance(node, list) else [node]


@pytest.mark.parametrize("calibration", ["joint", "union"])
def test_a_cascade_keeps_the_winner_at_its_miss_rate_and_picks_as_exhaustive_among_the_rest(calibration):
    """200 candidates; class information at grid points 20-24 only, where the true class and three near-ties stand
    out (so exhaustive's pick among those four is down to noise). A cascade fitted on 400 held-out images agrees
    with exhaustive scoring on at least 1 - miss_rate of 300 fresh ones for a fraction of its cost, and where it
    keeps the winner it picks it (the survivors see the whole grid)."""
    from diffusion_classifier.engine.shortlists import fit_cascade

    rng = np.random.default_rng(1)

    def images(n):
        errors = 1.0 + 0.05 * rng.standard_normal((n, 200, len(GRID)))
        for errors_of_one in errors:
            errors_of_one[rng.choice(200, 4, replace=False), 20:25] -= 0.3
        return errors

    held_out = images(400)
    cascade = fit_cascade(held_out, GRID, miss_rate=0.1, first=2, calibration=calibration)
    assert len(cascade.stages[0]["timesteps"]) == 2 and set(cascade.stages[0]["timesteps"]) <= set(GRID[20:25])
    assert cascade.fitted_on == 400 and all(0 <= stage["max_gap"] < float("inf") for stage in cascade.stages)
    # the winner's gap over every timestep scored up to each stage (as measured at run time), on both halves
    from diffusion_classifier.engine.shortlists import relative_gaps

    winners = held_out.mean(axis=2).argmin(axis=1)
    so_far, gaps = [], []
    for stage in cascade.stages:
        assert not {GRID.index(t) for t in stage["timesteps"]} & set(so_far)
        so_far += [GRID.index(t) for t in stage["timesteps"]]
        gaps.append(relative_gaps(held_out, so_far)[np.arange(len(held_out)), winners])
    gaps, max_gaps = np.array(gaps), np.array([stage["max_gap"] for stage in cascade.stages])
    calibrating = gaps[:, 1::2]
    if calibration == "union":  # each stage at the conformal quantile at the miss rate's share
        expected = [conformal_quantile(stage, 0.1 / len(cascade.stages)) for stage in calibrating]
        assert max_gaps == pytest.approx(expected, rel=1e-12)
    else:  # each stage's gap is one common factor times the choosing half's quantile of its winner's gap at one of
        # the levels (a level per stage), the factor such that the winner of at most 10% of the calibrating half
        # (the conformal count) exceeds one of them
        from diffusion_classifier.engine.shortlists import SCALE_LEVELS

        levels = np.array([np.quantile(gaps[:, 0::2], q, axis=1) for q in SCALE_LEVELS])  # [levels, stages]
        factors = max_gaps[0] / levels[:, 0][levels[:, 0] > 0]
        assert any(np.isclose(max_gaps[:, None] / factor, levels.T, rtol=1e-9).any(axis=1).all() for factor in factors)
        n = calibrating.shape[1]
        outside = (calibrating > max_gaps[:, None] * (1 + 1e-12)).any(axis=0).sum()
        assert outside == n - math.ceil((n + 1) * 0.9)
    agreed, nfe = 0, []
    for errors in images(300):
        winner = errors.mean(axis=1).argmin()
        table = replay(cascade, errors[:, None, :], GRID)
        survived = table.evidence.get(int(winner), {}).get("by") != "cascade"
        assert survived == (table.ranking()[0] == winner)  # survivors are ranked on the whole grid
        agreed += survived
        nfe.append(table.nfe)
    assert agreed / 300 >= 0.9 - 3 * np.sqrt(0.1 * 0.9 / 300)
    assert np.mean(nfe) < 0.2 * errors.size
    assert strategy_from_description(cascade.describe()).describe() == cascade.describe()


def test_both_calibrations_keep_the_promise_over_many_calibration_sets():
    """The promise is an average over held-out sets: 30 cascades, each fitted on 80 simulated images of 100
    candidates (three tied with the best, heavy-tailed noise, the class information uneven over the grid), each
    run on 40 fresh ones. Both calibrations drop exhaustive's winner on at most the miss rate of them (within
    three standard errors of the per-fit rates), and the joint one spends fewer evaluations."""
    from diffusion_classifier.engine.shortlists import fit_cascade

    grid = as_schedule(1000).grid(20, 0)
    results = {}
    for calibration in ("joint", "union"):
        rng = np.random.default_rng(0)
        missed, nfe = [], []
        for _ in range(30):
            held_out = np.stack([simulated_errors(rng, 100, 3, 20)[:, 0] for _ in range(80)])
            cascade = fit_cascade(held_out, grid, miss_rate=0.1, first=1, calibration=calibration)
            fresh = [simulated_errors(rng, 100, 3, 20) for _ in range(40)]
            tables = [replay(cascade, errors, grid) for errors in fresh]
            missed.append(np.mean([t.ranking()[0] != e[:, 0].mean(axis=1).argmin() for t, e in zip(tables, fresh)]))
            nfe += [t.nfe for t in tables]
        assert np.mean(missed) <= 0.1 + 3 * np.std(missed) / np.sqrt(len(missed))
        results[calibration] = np.mean(nfe)
    assert results["joint"] < results["union"] < 0.7 * 100 * 20


def test_a_cascade_estimates_its_cost_on_held_out_images_and_picks_among_options_by_it():
    """held_out_nfe, the NFE the fit expects on the images that chose its timesteps, is within 10% of replaying the
    cascade on them; given options for its first stage, the fit returns the option it estimates cheapest."""
    from diffusion_classifier.engine.shortlists import fit_cascade

    rng = np.random.default_rng(2)
    held_out = 1.0 + 0.05 * rng.standard_normal((300, 200, len(GRID)))
    for errors_of_one in held_out:
        errors_of_one[rng.choice(200, 4, replace=False), 20:25] -= 0.3
    fits = {k: fit_cascade(held_out, GRID, miss_rate=0.1, first=k) for k in (1, 2, 3)}
    for cascade in fits.values():
        replayed = np.mean([replay(cascade, errors[:, None, :], GRID).nfe for errors in held_out[0::2]])
        assert abs(cascade.held_out_nfe - replayed) < 0.1 * replayed
    cheapest = min(fits.values(), key=lambda cascade: cascade.held_out_nfe)
    assert fit_cascade(held_out, GRID, miss_rate=0.1, first=[1, 2, 3]).describe() == cheapest.describe()
    with pytest.raises(UserError, match="cannot be empty"):
        fit_cascade(held_out, GRID, miss_rate=0.1, first=[])


def test_a_coarse_family_that_comes_back_adds_timesteps_for_the_groups_still_in():
    """Coarse levels of one family twice (1 timestep for every group, then 2 more): the second level scores only the
    groups still in, at timesteps the first did not use, and prunes on the mean over all three; the cascade keeps
    exhaustive's winner on at least 1 - miss_rate of fresh images."""
    from diffusion_classifier.engine.shortlists import fit_cascade, gaps_to_best

    rng = np.random.default_rng(3)
    grid = as_schedule(1000).grid(20, 0)
    labels = [f"class {c}" for c in range(40)]
    family = {f"group {g}": labels[4 * g:4 * g + 4] for g in range(10)}

    def images(n):
        """[n, 40 classes + 10 groups, 20]: a true class, its group's coarse candidate a little better than the rest."""
        errors = 1.0 + 0.05 * rng.standard_normal((n, 50, 20))
        for errors_of_one, truth in zip(errors, rng.integers(0, 40, n)):
            errors_of_one[truth, 5:15] -= 0.06
            errors_of_one[40 + truth // 4, 5:15] -= 0.04
        return errors

    held_out = images(200)
    cascade = fit_cascade(held_out[:, :40], grid, 0.1, labels=labels,
                          levels=[(family, held_out[:, 40:], 1), (family, held_out[:, 40:], 2)])
    first, second = cascade.stages[:2]
    assert cascade.families == [family] and first["family"] == second["family"] == 0
    assert len(first["timesteps"]) == 1 and len(second["timesteps"]) == 2
    assert not set(first["timesteps"]) & set(second["timesteps"])
    cascade = cascade.resolve(labels + list(family))
    coarse_columns = [grid.index(t) for t in first["timesteps"] + second["timesteps"]]
    agreed = 0
    for errors in images(100):
        table = replay(cascade, errors[:, None, :], grid)
        scored = table.evaluated[40:, 0].sum(axis=1)  # timesteps each group's coarse candidate was scored at
        assert (scored >= 1).all() and set(scored) <= {1, 3}  # never one timestep twice
        live = np.flatnonzero(scored == 3)
        if len(live) > 1:  # the second level kept the classes of the groups within its gap over all three timesteps
            gaps = gaps_to_best(errors[40 + live][:, coarse_columns].mean(axis=1))
            kept = live[gaps <= second["max_gap"]]
            dropped = {c for c, why in table.evidence.items() if why.get("stage") == 1}
            assert dropped == {c for g in live if g not in kept for c in range(4 * g, 4 * g + 4)}
        prediction = next(c for c in table.ranking() if c < 40)
        agreed += prediction == errors[:40].mean(axis=1).argmin()
    assert agreed / 100 >= 0.9 - 3 * np.sqrt(0.1 * 0.9 / 100)


def test_cascade_coarse_levels_and_its_file(models, tmp_path):
    """A coarse level scores the coarse candidates of the live groups and keeps the classes of those within its gap;
    the fine stages and the rest of the grid follow; the cascade survives a save and load."""
    from diffusion_classifier import Cascade, DiffusionClassifier

    from .conftest import random_images

    classes = ["red cat", "red dog", "blue cat", "blue dog", "green cat", "green dog"]
    colour = {"a red thing": classes[0:2], "a blue thing": classes[2:4], "a green thing": classes[4:6]}
    stages = [{"timesteps": [450], "max_gap": 0.0, "family": 0}, {"timesteps": [250], "max_gap": 1e9}]
    cascade = Cascade(stages, grid=5, miss_rate=0.1, families=[colour])
    clf = DiffusionClassifier.from_pretrained(models["pixel_text"], labels=classes, templates=["a photo of {}."],
                                              strategy=cascade)
    result = clf.classify(random_images(1, size=8, mode="L"))[0]
    assert {label for label, _ in result.ranking} == set(classes)
    assert result.nfe == 3 * 1 + 2 * 5  # three colours once, then both classes of the best colour on the 5-point grid
    dropped = {c for c, why in result.extra["evidence"].items() if why["by"] == "cascade"}
    assert len(dropped) == 4 and result.prediction not in dropped
    cascade.save(tmp_path / "cascade.json")
    assert Cascade.load(tmp_path / "cascade.json").describe() == cascade.describe()
    (tmp_path / "other.json").write_text(json.dumps({"name": "elimination"}))
    with pytest.raises(UserError, match="does not describe a cascade"):
        Cascade.load(tmp_path / "other.json")
    with pytest.raises(UserError, match="names a family it does not hold"):
        Cascade([{"timesteps": [10], "max_gap": 0.1, "family": 1}], grid=5, miss_rate=0.1, families=[colour])
    with pytest.raises(UserError, match="is not a candidate label"):
        DiffusionClassifier.from_pretrained(models["pixel_text"], labels=classes[:2], templates=["{}"],
                                            strategy=cascade)


def test_calibrate_fits_a_cascade_that_evaluate_uses(models, tmp_path, capsys):
    from diffusion_classifier.cli import main

    names, data, run_dir = exhaustive_run(models, tmp_path, 4)
    code = main(["calibrate", str(run_dir), "--cascade", "--miss-rate", "0.5", "--first", "1", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    description = json.loads(out.strip().splitlines()[-1])
    assert description["name"] == "cascade" and description["grid"] == 8 and description["fitted_on"] == 24
    assert description["calibration"] == "joint" and len(description["stages"][0]["timesteps"]) in (1, 2)
    assert 0 < description["held_out_nfe"] <= 4 * 8
    assert (run_dir / "cascade.json").is_file()
    code = main(["evaluate", "--model", str(models["pixel_text"]), "--data", str(data), "--out",
                 str(tmp_path / "fast"), "--strategy", "cascade", "--cascade", str(run_dir), "--quiet", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads(out.strip().splitlines()[-1])
    assert metrics["images"] == 24 and 6 <= metrics["nfe_per_image"] <= 6 * 8
    for argv, message in ((["--cascade", str(run_dir)], "does not use --cascade (cascade)"),
                          (["--strategy", "cascade"], "needs --cascade"),
                          (["--strategy", "cascade", "--cascade", str(run_dir), "--timesteps", "4"],
                           "does not use --timesteps (exhaustive)")):
        code = main(["classify", str(next((data / "dog").iterdir())), "--model", str(models["pixel_text"]),
                     "--labels", ",".join(names), *argv])
        assert code != 0 and message in capsys.readouterr().err
    code = main(["calibrate", str(run_dir), "--cascade", "--miss-rate", "0.05"])
    assert code != 0 and "cannot bound a miss rate" in capsys.readouterr().err
    code = main(["calibrate", str(run_dir), "--first", "2"])  # a cascade's setting without --cascade: refused
    assert code != 0 and "--first goes with --cascade" in capsys.readouterr().err


def test_calibrate_fits_coarse_levels_from_a_run_that_scored_the_coarse_labels(models, tmp_path, capsys):
    """calibrate --cascade --families: the coarse labels' rows of one exhaustive run feed the levels (the same fit as
    fit_cascade on those rows), the other labels are the classes; evaluate then runs the cascade on the classes."""
    from diffusion_classifier.cli import main
    from diffusion_classifier.engine.shortlists import fit_cascade
    from diffusion_classifier.store import read_run
    from diffusion_classifier.tasks import task_of

    from .conftest import image_folder

    classes = ["red cat", "red dog", "blue cat", "blue dog", "green cat", "green dog"]
    colour = {f"a {c} thing": [f"{c} cat", f"{c} dog"] for c in ("red", "blue", "green")}
    animal = {"a cat": classes[0::2], "a dog": classes[1::2]}
    (tmp_path / "families.json").write_text(json.dumps([colour, animal]))
    (tmp_path / "colour.json").write_text(json.dumps(colour))
    (tmp_path / "animal.json").write_text(json.dumps([animal]))
    data = image_folder(tmp_path / "data", classes, 2, size=8, mode="L")
    run_dir = tmp_path / "run"
    scoring = ["--model", str(models["pixel_text"]), "--template", "a photo of {}.", "--quiet"]
    assert main(["evaluate", "--data", str(data), "--out", str(run_dir), "--timesteps", "8", *scoring,
                 "--labels", ",".join([*animal, *classes, *colour])]) == 0  # coarse labels anywhere among the classes
    capsys.readouterr()
    code = main(["calibrate", str(run_dir), "--cascade", "--families", str(tmp_path / "families.json"),
                 "--levels", "1:1", "0:1/2", "1:2", "--first", "1", "--miss-rate", "0.5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    description = json.loads(out.strip().splitlines()[-1])
    assert [stage["family"] for stage in description["stages"][:3]] == [0, 1, 0]
    assert description["families"] == [animal, colour]  # in the order the levels first use them
    assert all(stage["family"] is None for stage in description["stages"][3:])

    code = main(["calibrate", str(run_dir), "--cascade", "--families", str(tmp_path / "colour.json"),
                 str(tmp_path / "animal.json"), "--miss-rate", "0.5", "--json"])  # the defaults: each family twice
    # (2, then 4 more), first 1-3; two files: their families in order
    out, err = capsys.readouterr()
    assert code == 0, err
    default = json.loads(out.strip().splitlines()[-1])
    assert [(stage["family"], len(stage["timesteps"])) for stage in default["stages"][:4]] == [
        (0, 2), (0, 4), (1, 2), (1, 4)]
    assert default["families"] == [colour, animal] and 1 <= len(default["stages"][4]["timesteps"]) <= 3

    config, rows = read_run(run_dir)
    errors, grid = task_of(config).error_grids(config, rows)
    row = {label: i for i, label in enumerate(config["labels"])}
    direct = fit_cascade(errors[:, [row[c] for c in classes]], grid, 0.5, 1, labels=classes,
                         levels=[(animal, errors[:, [row[g] for g in animal]], 1),
                                 (colour, errors[:, [row[g] for g in colour]], [1, 2]),
                                 (animal, errors[:, [row[g] for g in animal]], 2)])
    assert direct.describe() == description

    code = main(["evaluate", "--data", str(data), "--out", str(tmp_path / "fast"), *scoring, "--labels",
                 ",".join(classes), "--strategy", "cascade", "--cascade", str(run_dir), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["images"] == 12

    (tmp_path / "more.json").write_text(json.dumps({**colour, "a purple thing": ["red cat"]}))
    (tmp_path / "stray.json").write_text(json.dumps({"a cat": ["red cat", "pink cat"], "a dog": classes[1::2]}))
    for argv, message in ((["--families", str(tmp_path / "more.json")], "did not score the coarse label 'a purple"),
                          (["--families", str(tmp_path / "stray.json")], "holds 'pink cat', which is not a class"),
                          (["--families", str(tmp_path / "families.json"), "--levels", "2:2"], "names family 2"),
                          (["--families", str(tmp_path / "families.json"), "--levels", "0-2"], "FAMILY:TIMESTEPS"),
                          (["--levels", "0:2"], "--levels goes with --families")):
        code = main(["calibrate", str(run_dir), "--cascade", "--miss-rate", "0.5", *argv])
        assert code != 0 and message in capsys.readouterr().err
    code = main(["calibrate", str(run_dir), "--families", str(tmp_path / "families.json")])
    assert code != 0 and "--families goes with --cascade" in capsys.readouterr().err


def test_the_benchmarks_cross_fitting_predicts_each_image_by_fits_it_took_no_part_in():
    """benchmarks/many_classes.py: each fold assignment splits the images into folds that each image is in once;
    a fit never sees the images it predicts; repeated assignments are averaged per image in a row."""
    from benchmarks.many_classes import cross_fitted, fold_assignments, strategy_row
    from diffusion_classifier.engine.strategies import Exhaustive

    assert [list(part) for part in fold_assignments(6, 2, 1)[0]] == [[1, 3, 5], [0, 2, 4]]
    assignments = fold_assignments(50, 6, 3)
    for parts in assignments:
        assert sorted(np.concatenate(parts)) == list(range(50)) and len(parts) == 6
    assert not all((a == b).all() for a, b in zip(assignments[0], assignments[1]))
    assert all((a == b).all() for a, b in zip(assignments[0], fold_assignments(50, 6, 3)[0]))  # seeded

    rng = np.random.default_rng(4)
    grid = as_schedule(1000).grid(5, 0)
    errors = 1.0 + 0.1 * rng.random((50, 4, 1, 5))
    errors[:, 0, 0, 0] = np.arange(50)  # each image's id, where a fit can read it
    seen = []

    class Fitted:
        def to_dict(self):
            return {}

    def fit(held_out):
        seen.append(set(held_out[:, 0, 0, 0].astype(int)))
        return Fitted()

    predictions, nfe, _ = cross_fitted(lambda fitted: Exhaustive(5), fit, errors, grid, folds=5, repeats=2)
    assert predictions.shape == nfe.shape == (2, 50) and (nfe == 4 * 5).all()
    for held_out, scored in zip(seen, [part for parts in fold_assignments(50, 5, 2) for part in parts]):
        assert not held_out & set(scored) and len(held_out | set(scored)) == 50
    labels = np.zeros(3, int)
    row = strategy_row("r", np.array([[0, 1, 0], [0, 0, 1]]), np.array([[1, 2, 3], [4, 5, 6]]), {}, labels,
                       np.zeros(3, int))
    assert row["accuracy"] == pytest.approx(4 / 6) and row["agreement"] == pytest.approx(4 / 6)
    assert row["repeats"] == 2 and row["nfe_mean_per_repeat"] == [2.0, 5.0] and row["nfe_mean"] == 3.5


def test_the_benchmarks_replay_leaves_out_coarse_rows_the_cascade_does_not_score():
    """benchmarks/many_classes.py: a cascade takes any candidate outside its families for a class, so a replay on a
    table holding other families' coarse rows must leave them out, as a classifier would never hold them."""
    from benchmarks.many_classes import replayed_fine, with_coarse
    from diffusion_classifier import Cascade

    rng = np.random.default_rng(0)
    grid = [100, 300, 500, 700, 900]
    errors = rng.random((3, 4, 1, 5)) + 1.0
    other_family = rng.random((3, 2, 1, 5)) + 1.0  # two coarse rows of a family this cascade does not use
    cascade = Cascade([{"timesteps": [500], "max_gap": 1e9}], grid=5, miss_rate=0.1)
    alone = replayed_fine(cascade, errors, grid, 4)
    combined = with_coarse(errors, grid, other_family, grid)
    np.testing.assert_array_equal(replayed_fine(cascade, combined, grid, 4, coarse_rows=[])[1], alone[1])
    assert (replayed_fine(cascade, combined, grid, 4)[1] > alone[1]).all()  # what the benchmark counted before
