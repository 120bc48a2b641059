"""Scoring under distribution shift: noise-aware timesteps and intensity normalisation.

Noise-aware: an input that already carries Gaussian noise of level sigma (on the [-1, 1] scale) looks
like the model's x_t / sqrt(abar_t) at the t where sqrt((1 - abar_t) / abar_t) = sigma, so errors at
smaller t measure the corruption rather than the class. We estimate sigma per image and evaluate only
timesteps at or above that level (the strategy's grid is laid over [t_min, T) with the same count, so
the cost is unchanged and every candidate still shares the same (t, eps) pairs).

The estimator is Donoho and Johnstone's: the median absolute finest-scale diagonal wavelet coefficient
divided by 0.6745 (scikit-image's estimate_sigma does the same with a Daubechies wavelet and needs
PyWavelets; we use the Haar wavelet, vectorised in torch).

Intensity normalisation: map each image's mean and standard deviation to the averages of the model's
training images (stored in its config as `intensity_stats`). It undoes global contrast and brightness
changes; it should not be used where the absolute intensity is informative for the classes, and it
changes clean inputs whose statistics are far from the average (its cost on clean accuracy is reported
by benchmarks/robustness.py).
"""

from __future__ import annotations

import torch

from .errors import UserError

MAD_TO_SIGMA = 0.6745


def estimate_noise_sigma(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian noise level of images in [-1, 1], shape [B, C, H, W] -> [B] (same scale)."""
    h, w = pixels.shape[-2] // 2 * 2, pixels.shape[-1] // 2 * 2
    x = pixels[..., :h, :w].float()
    diagonal = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return diagonal.abs().flatten(1).median(dim=1).values / MAD_TO_SIGMA


def noise_levels(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio of each timestep (increasing in t)."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def min_timestep_for(sigma: torch.Tensor, alphas_cumprod: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The first timestep whose noise level is at least margin * sigma, per image (0 for clean images)."""
    levels = noise_levels(alphas_cumprod)
    t = torch.searchsorted(levels, (margin * sigma).double().cpu())
    return t.clamp(max=len(levels) - 1)


def intensity_stats(pixels: torch.Tensor) -> dict:
    """Average per-image mean and standard deviation of training images in [-1, 1]."""
    flat = pixels.float().flatten(1)
    return {"mean": float(flat.mean(dim=1).mean()), "std": float(flat.std(dim=1).mean())}


def normalize_intensity(pixels: torch.Tensor, stats: dict | None) -> torch.Tensor:
    if not stats:
        raise UserError("this model has no stored intensity statistics (intensity_stats in model_index.json); "
                        "intensity normalisation needs them")
    flat = pixels.float().flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp_min(1e-3).view(-1, 1, 1, 1)
    return ((pixels - mean) / std * stats["std"] + stats["mean"]).clamp(-1, 1)
