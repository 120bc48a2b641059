import numpy as np
import pytest
import torch

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, Staged, UserError, load_denoiser, preset
from diffusion_classifier.adapters.schedules import even_timesteps
from diffusion_classifier.data import preprocess
from diffusion_classifier.engine.scoring import image_seed, noise_for
from diffusion_classifier.engine.strategies import ScoreTable

from .conftest import CLASSES, random_images


def test_even_grid_is_the_papers():
    assert even_timesteps(1000, 25) == list(range(20, 1000, 40))
    assert even_timesteps(1000, 1) == [500]
    assert len(even_timesteps(1000, 1000)) == 1000
    with pytest.raises(UserError):
        even_timesteps(1000, 0)


def _original_stage_grids(n_samples, T=1000):
    """The original implementation's stage loop, transcribed (n_trials = 1)."""
    max_n = max(n_samples)
    t_to_eval = list(range(T // max_n // 2, T, T // max_n))[:max_n]
    evaluated, grids = set(), []
    for n in n_samples:
        curr = t_to_eval[len(t_to_eval) // n // 2::len(t_to_eval) // n][:n]
        curr = [t for t in curr if t not in evaluated]
        evaluated.update(curr)
        grids.append(curr)
    return grids


# the original code's commands per dataset: --to_keep, --n_samples, --loss
PAPER_SCHEDULES = {
    "cifar10": ([5, 1], [50, 500], "l1"), "pets": ([5, 1], [25, 250], "l1"), "stl10": ([5, 1], [100, 500], "l1"),
    "food": ([20, 10, 5, 1], [20, 50, 100, 500], "l2"), "aircraft": ([20, 10, 5, 1], [20, 50, 100, 500], "l2"),
    "flowers": ([20, 10, 5, 1], [20, 50, 100, 500], "l1"), "imagenet": ([500, 50, 10, 1], [50, 100, 500, 1000], "l2"),
    "objectnet": ([25, 10, 5, 1], [50, 100, 500, 1000], "l2"),
}


@pytest.mark.parametrize("name", list(PAPER_SCHEDULES))
def test_every_preset_matches_the_original_stage_grids(name):
    strategy = preset(name).strategy
    to_keep, n_samples, loss = PAPER_SCHEDULES[name]
    assert (strategy.to_keep, strategy.n_samples, preset(name).loss) == (to_keep, n_samples, loss)
    assert strategy.stage_timesteps(1000) == _original_stage_grids(strategy.n_samples)


def test_preset_costs_match_the_paper():
    assert preset("cifar10").strategy.expected_nfe(10, 1000) == 2750
    assert preset("pets").strategy.expected_nfe(37, 1000) == 2050
    assert preset("mnist").strategy is None and preset("cifar100").strategy is None  # the paper gives none


def test_staged_run_spends_exactly_the_expected_nfe(models):
    strategy = Staged([4, 12], [2, 1])
    clf = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=strategy)
    results = clf.classify(random_images(2, mode="L"))
    for r in results:
        assert r.nfe == strategy.expected_nfe(len(CLASSES), 1000) == 4 * 4 + 2 * 8
        counts = np.isfinite(r.errors[:, 0, :]).sum(axis=1)
        assert sorted(counts.tolist()) == [4, 4, 12, 12]
        assert counts[r.prediction_index] == 12  # the winner survived to the last stage


def test_candidates_share_timesteps_and_noise(models):
    """Give every class the same embedding: then paired (t, eps) must give identical errors."""
    denoiser = load_denoiser(models["pixel_class"])
    with torch.no_grad():
        denoiser.network.class_embedding.weight[:] = denoiser.network.class_embedding.weight[0]
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(6))
    (result,) = clf.classify(random_images(1, mode="L"))
    assert result.errors.shape == (4, 1, 6)
    for c in range(1, 4):
        np.testing.assert_allclose(result.errors[c], result.errors[0], rtol=1e-6)


def test_results_do_not_depend_on_batch_size_or_grouping(models):
    imgs = random_images(3)
    small = DiffusionClassifier.from_pretrained(models["sd"], labels=CLASSES, strategy=Exhaustive(5), batch_size=3,
                                                images_per_batch=1)
    large = DiffusionClassifier.from_pretrained(models["sd"], labels=CLASSES, strategy=Exhaustive(5), batch_size=64,
                                                images_per_batch=8)
    a, b = small.classify(imgs), large.classify(imgs)
    alone = large.classify(imgs[2:][::-1])
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.errors, y.errors, rtol=1e-4, atol=1e-6)
        assert x.prediction == y.prediction
    np.testing.assert_allclose(alone[0].errors, b[2].errors, rtol=1e-4, atol=1e-6)


def test_same_seed_same_result_other_seed_other_noise(models):
    imgs = random_images(2)
    make = lambda seed: DiffusionClassifier.from_pretrained(models["dit"], strategy=Exhaustive(4), seed=seed)  # noqa: E731
    a, b, c = make(0).classify(imgs), make(0).classify(imgs), make(1).classify(imgs)
    np.testing.assert_array_equal(a[0].errors, b[0].errors)
    assert not np.allclose(a[0].errors, c[0].errors)


def test_explicit_noise_reproduces_errors_and_matches_a_hand_computation(models):
    clf = DiffusionClassifier.from_pretrained(models["sd_v"], labels=CLASSES, strategy=Exhaustive(3))
    img = random_images(1)
    (default,) = clf.classify(img)
    pixels = preprocess(img, 16, 3)
    x0 = clf.denoiser.encode_images(pixels)
    seed = image_seed(clf.config.seed, pixels[0])
    noise = torch.stack([noise_for(seed, t, x0.shape[1:]) for t in default.timesteps])
    (explicit,) = clf.classify(img, noise=[noise])
    np.testing.assert_allclose(explicit.errors, default.errors, rtol=1e-6)

    # Hand computation for class 2 at the second timestep, straight through diffusers' modules.
    den = clf.denoiser
    t = default.timesteps[1]
    abar = den.scheduler.alphas_cumprod[t]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise[1:2]
    hidden = den.text_encoder(den.tokenizer([CLASSES[2]], padding="max_length", max_length=16,
                                            return_tensors="pt").input_ids)[0]
    v = den.network(x_t, torch.tensor([t]), encoder_hidden_states=hidden).sample
    eps_hat = abar.sqrt() * v + (1 - abar).sqrt() * x_t
    expected = ((noise[1:2] - eps_hat) ** 2).mean().item()
    assert default.errors[2, 0, 1] == pytest.approx(expected, rel=1e-4)

    with pytest.raises(UserError, match="explicit noise"):
        clf.classify(img, noise=[noise[:2]])


def test_loss_option_changes_the_errors(models):
    img = random_images(1, mode="L")
    errs = {}
    for loss in ("l1", "l2", "huber"):
        clf = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(3), loss=loss)
        errs[loss] = clf.classify(img)[0].errors
    assert not np.allclose(errs["l1"], errs["l2"])
    assert (errs["huber"] <= errs["l2"] / 2 + 1e-7).all()  # huber <= x^2/2 elementwise


def test_template_aggregation_min_and_mean():
    table = ScoreTable(2, 2)
    for t in (10, 20):
        table.column(t)
    table.record(0, slice(None), slice(None), [[0.1, 0.3], [0.5, 0.5]])  # class 0: prompt means 0.2 and 0.5
    table.record(1, slice(None), slice(None), [[0.3, 0.3], [0.3, 0.3]])  # class 1: 0.3 and 0.3
    np.testing.assert_allclose(table.class_scores("min"), [0.2, 0.3])
    np.testing.assert_allclose(table.class_scores("mean"), [0.35, 0.3])
    assert table.ranking("min")[0] == 0 and table.ranking("mean")[0] == 1


def test_templates_expand_to_prompts_per_class(models):
    clf = DiffusionClassifier.from_pretrained(models["pixel_text"], labels=["cat", "dog"],
                                              templates=["a photo of a {}.", "a {}"], strategy=Exhaustive(2))
    assert clf.prompts_ == [["a photo of a cat.", "a cat"], ["a photo of a dog.", "a dog"]]
    (r,) = clf.classify(random_images(1, mode="L"))
    assert r.errors.shape == (2, 2, 2) and r.nfe == 8


def test_predict_and_predict_proba(models):
    clf = DiffusionClassifier.from_pretrained(models["dit"], labels=["dog", "fish"], strategy=Exhaustive(3),
                                              temperature=0.01)
    imgs = random_images(3)
    predictions = clf.predict(imgs)
    proba = clf.predict_proba(imgs)
    assert proba.shape == (3, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1)
    assert list(predictions) == [clf.classes_[i] for i in proba.argmax(axis=1)]
    assert clf.classes_ == ["dog", "fish"]


def test_input_types_give_the_same_result(models):
    clf = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(2))
    img = random_images(1, size=8, mode="L")[0]
    array = np.array(img)
    tensor = torch.from_numpy(array).float() / 127.5 - 1
    results = clf.classify([img, array, tensor[None]])
    np.testing.assert_allclose(results[0].errors, results[1].errors)
    np.testing.assert_allclose(results[0].errors, results[2].errors, rtol=1e-5)


def test_class_labels_match_full_names_or_comma_separated_synonyms(models, tmp_path):
    import json
    import shutil

    dit = tmp_path / "dit"
    shutil.copytree(models["dit"], dit)
    index = json.loads((dit / "model_index.json").read_text())
    index["id2label"] = {"0": "tench, Tinca tinca", "1": "goldfish, Carassius auratus", "2": "shark", "3": "ray"}
    (dit / "model_index.json").write_text(json.dumps(index))
    clf = DiffusionClassifier.from_pretrained(dit, labels=["goldfish", "tench, Tinca tinca", 3])
    assert clf.classes_ == ["goldfish, Carassius auratus", "tench, Tinca tinca", "ray"]


def test_class_labels_must_exist(models):
    with pytest.raises(UserError, match="not one of the model's classes"):
        DiffusionClassifier.from_pretrained(models["dit"], labels=["unicorn"])
    with pytest.raises(UserError, match="outside"):
        DiffusionClassifier.from_pretrained(models["dit"], labels=[7])
    with pytest.raises(UserError, match="templates"):
        DiffusionClassifier.from_pretrained(models["dit"], templates=["a {}"])


def test_strategies_share_errors_at_common_timesteps(models):
    """Noise is keyed by timestep, so different strategies agree wherever they evaluate the same (class, t)."""
    img = random_images(1, mode="L")
    a = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(10)).classify(img)[0]
    b = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Staged([5, 10], [2, 1])).classify(img)[0]
    common = sorted(set(a.timesteps) & set(b.timesteps))
    assert common
    for t in common:
        col_a, col_b = a.timesteps.index(t), b.timesteps.index(t)
        evaluated = np.isfinite(b.errors[:, 0, col_b])
        np.testing.assert_allclose(a.errors[evaluated, 0, col_a], b.errors[evaluated, 0, col_b], rtol=1e-5)


def test_replaying_a_strategy_on_a_stored_exhaustive_run_equals_running_it(models):
    from diffusion_classifier.engine.replay import replay

    imgs = random_images(3, mode="L")
    full = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(20)).classify(imgs)
    staged = Staged([5, 20], [2, 1])  # its finest grid is the 20-point grid
    direct = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=staged).classify(imgs)
    for f, d in zip(full, direct):
        table = replay(staged, f.errors, f.timesteps)
        assert table.nfe == d.nfe and table.ranking()[0] == d.prediction_index
        np.testing.assert_allclose(table.errors, d.errors, rtol=1e-5)
    with pytest.raises(UserError, match="stored grid"):
        replay(Exhaustive(7), full[0].errors, full[0].timesteps)


def test_the_null_row_is_scored_at_the_candidates_pairs(models):
    from diffusion_classifier.engine.scoring import Job, ScoringEngine

    denoiser = load_denoiser(models["pixel_text"])
    engine = ScoringEngine(denoiser, denoiser.embed_conditions(["a cat", "a dog", ""]), batch_size=5)
    x0 = denoiser.encode_images(preprocess(random_images(2, size=8, mode="L"), 8, 1))
    rows = np.array([[0], [1], [2]])  # the empty prompt as a candidate too: its error must equal the null's
    jobs = [Job(x0[i], noise_key=i, rows=rows, null_row=2) for i in range(2)]
    for table in engine.score(jobs, Exhaustive(4)):
        assert len(table.timesteps) == 4 and table.nfe == 3 * 4 + 4
        np.testing.assert_allclose(table.null_errors, table.errors[2, 0], rtol=1e-6)  # other batches: rounding
    (table,) = engine.score([Job(x0[0], noise_key=0, rows=rows[:2], null_row=2)], Elimination(0.5, max_timesteps=40))
    assert np.isfinite(table.null_errors).all()  # every column any candidate reached, even after pruning
