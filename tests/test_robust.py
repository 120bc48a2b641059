"""Noise-aware timesteps and intensity normalisation."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusion_classifier import DiffusionClassifier, Exhaustive, Staged, UserError, load_denoiser
from diffusion_classifier.adapters.schedules import VPSchedule, even_timesteps
from diffusion_classifier.engine.robust import (
    estimate_noise_sigma,
    intensity_stats,
    min_timestep_for,
    normalize_intensity,
)

from .conftest import random_images


def _smooth_images(n=8, size=64, seed=0):
    """Piecewise-smooth images in [-1, 1] (gradients and a bright disc), like real photos' low noise."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(n):
        a, b, r = torch.rand(3, generator=g)
        disc = ((xx - a + 0.5) ** 2 + (yy - b + 0.5) ** 2 < (0.3 + 0.3 * r) ** 2).float()
        images.append((0.4 * xx * a + 0.3 * yy * b + 0.5 * disc - 0.2).clamp(-0.9, 0.9))
    return torch.stack(images)[:, None]


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2, 0.4])
def test_noise_estimate_recovers_a_known_sigma_within_15_percent(sigma):
    clean = _smooth_images()
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    estimate = estimate_noise_sigma(noisy)
    assert ((estimate - sigma).abs() / sigma).max() < 0.15
    assert estimate_noise_sigma(clean).max() < 0.02


def test_min_timestep_matches_the_noise_level_definition():
    schedule = VPSchedule(DDPMScheduler().alphas_cumprod)
    t = min_timestep_for(torch.tensor([0.0, 0.2, 1.0]), schedule)
    abar = DDPMScheduler().alphas_cumprod.double()
    levels = ((1 - abar) / abar).sqrt()
    assert t[0] == 0
    for sigma, ti in zip((0.2, 1.0), t[1:].tolist()):
        assert levels[ti] >= sigma > levels[ti - 1]


def test_restricted_grids_keep_the_count_and_the_range():
    assert even_timesteps(1000, 25, 0) == list(range(20, 1000, 40))
    grid = even_timesteps(1000, 25, 400)
    assert len(grid) == 25 and min(grid) >= 400 and max(grid) < 1000
    stages = Staged([10, 40], [2, 1]).stage_timesteps(1000, 300)
    assert all(t >= 300 for stage in stages for t in stage)


def test_noise_aware_scoring_keeps_the_pairing_and_skips_small_timesteps(models):
    clean = random_images(2, size=8, mode="L")
    noisy = [np.clip(np.asarray(im, dtype=float) + np.random.default_rng(0).normal(0, 60, (8, 8)), 0, 255)
             .astype(np.uint8) for im in clean]
    clf = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(10), noise_aware=True)
    for r in clf.classify(noisy):
        assert min(r.timesteps) > 0 and len(r.timesteps) == 10
        assert np.isfinite(r.errors).all()  # every class at every chosen (t, eps): still paired


def test_options_with_nothing_to_correct_give_exactly_the_plain_results(models):
    """Noise-aware scoring of near-clean images and intensity normalisation of in-band images take their
    own code paths (a small t_min, a band check) and must still give the plain errors bit for bit."""
    denoiser = load_denoiser(models["pixel_class"])
    images = _smooth_images(3, size=8, seed=2)
    images = images + 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
    images = torch.round((images - lo) / (hi - lo) * 255) / 127.5 - 1  # 8-bit, each spanning [-1, 1]
    denoiser.info.intensity_stats = intensity_stats(images)
    t_min = min_timestep_for(estimate_noise_sigma(images), denoiser.schedule, 2.0)
    assert (t_min > 0).all() and (t_min <= 1000 // 5 // 2).all()  # a real restriction, below the first grid point
    plain = DiffusionClassifier(denoiser, strategy=Exhaustive(5)).classify_pixels(images, ["a", "b", "c"])
    for options in ({"noise_aware": True}, {"normalize_intensity": True},
                    {"noise_aware": True, "normalize_intensity": True}):
        clf = DiffusionClassifier(denoiser, strategy=Exhaustive(5), **options)
        for a, b in zip(plain, clf.classify_pixels(images, ["a", "b", "c"])):
            assert a.timesteps == b.timesteps
            np.testing.assert_array_equal(a.errors, b.errors)


def test_normalisation_is_the_identity_on_in_distribution_images():
    images = _smooth_images(32)
    lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
    levels = torch.round((images - lo) / (hi - lo) * 255)  # 8-bit images spanning 0-255, like Fashion-MNIST
    images = levels / 127.5 - 1
    stats = intensity_stats(images)
    assert stats["low"] == -1 and stats["high"] == 1
    assert torch.equal(normalize_intensity(images, stats), images)  # in band: untouched, bit for bit
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    for shifted in (0.5 * (images - mean) + mean, 0.8 * images + 0.1):  # contrast, and contrast + brightness
        assert torch.equal(normalize_intensity(shifted, stats), images)  # recovered bit for bit
    # a dark image of another distribution is stretched, not kept: the documented reason not to use it there
    dark = 0.3 * images - 0.6
    assert (normalize_intensity(dark, stats) - dark).abs().max() > 0.5


def test_normalised_inputs_share_the_noise_of_the_image_they_recover(models, tmp_path):
    from diffusion_classifier.adapters.loading import load_denoiser as load

    denoiser = load(models["pixel_class"])
    x = torch.round(torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255)
    x[:, :, 0, 0], x[:, :, 0, 1] = 0, 255
    x = x / 127.5 - 1
    denoiser.info.intensity_stats = intensity_stats(x)
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(5), normalize_intensity=True)
    clean, faded = (clf.classify_pixels(p, ["a", "b"]) for p in (x, 0.6 * x))
    for a, b in zip(clean, faded):
        np.testing.assert_array_equal(a.errors, b.errors)


def test_options_are_refused_where_they_do_not_apply(models):
    with pytest.raises(UserError, match="pixel-space"):
        DiffusionClassifier.from_pretrained(models["sd"], labels=["a", "b"], noise_aware=True)
    with pytest.raises(UserError, match="intensity statistics"):
        DiffusionClassifier(load_denoiser(models["pixel_class"]), normalize_intensity=True)


def test_a_noise_level_that_excludes_no_grid_point_leaves_the_plain_grid():
    assert even_timesteps(1000, 10, t_min=50) == even_timesteps(1000, 10) == list(range(50, 1000, 100))
    moved = even_timesteps(1000, 10, t_min=51)
    assert len(moved) == 10 and min(moved) >= 51
