"""Noise schedules: where a timestep grid position puts an image, and what the network is told.

Every family is scored on positions t = 0 .. T-1 of its training schedule (T = num_train_timesteps),
noisier as t grows; strategies lay their grids over these positions and never look further. A schedule
maps a position to
  * the network's timestep input (the integer t for DDPM-style models, sigma * T for SD3, ...),
  * the signal and noise scales of x_t = a_t x0 + b_t eps,
  * the variance-preserving equivalent alpha_bar_t = a_t^2 / (a_t^2 + b_t^2) and its log-SNR,
and converts whatever the network predicts into an epsilon estimate, so the error is always taken on
the noise: the paper's objective, on one footing for every family.

Two implementations: `VPSchedule` (DDPM, Stable Diffusion 1.x/2.x, DiT: a_t = sqrt(abar_t),
b_t = sqrt(1 - abar_t) from the scheduler's alphas_cumprod) and `RectifiedFlowSchedule` (SD3, Flux:
a_t = 1 - sigma_t, b_t = sigma_t, the network predicts the velocity v = eps - x0).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError


def even_timesteps(num_train_timesteps: int, n: int, t_min: int = 0) -> list[int]:
    """The paper's grid: range(T // n // 2, T, T // n), first n entries.

    With t_min above the grid's first point (noise-aware scoring), the n points are laid over
    [t_min, T) instead; a t_min that excludes no point leaves the paper's grid, and so the plain results,
    unchanged.
    """
    if not 1 <= n <= num_train_timesteps:
        raise UserError(f"number of timesteps must lie in [1, {num_train_timesteps}], got {n}")
    if t_min <= num_train_timesteps // n // 2:
        t_min = 0
    span = num_train_timesteps - t_min
    n = min(n, span)
    step = span // n
    return list(range(t_min + step // 2, num_train_timesteps, step))[:n]


def logit_normal_timesteps(num_train_timesteps: int, n: int, t_min: int = 0) -> list[int]:
    """n positions at the quantiles (k + 1/2) / n of the logit-normal(0, 1) training density of SD3-style
    flow models: u = sigmoid(z), z ~ N(0, 1), indexes the scheduler's sigmas from the noisiest down, so
    the position is T - 1 - floor(u T). Duplicates (large n) are dropped; positions below t_min too."""
    from statistics import NormalDist

    if not 1 <= n <= num_train_timesteps:
        raise UserError(f"number of timesteps must lie in [1, {num_train_timesteps}], got {n}")
    z = [NormalDist().inv_cdf((k + 0.5) / n) for k in range(n)]
    u = [1 / (1 + math.exp(-v)) for v in z]
    positions = [num_train_timesteps - 1 - min(num_train_timesteps - 1, int(x * num_train_timesteps)) for x in u]
    return [t for t in dict.fromkeys(sorted(positions)) if t >= t_min] or [max(positions)]


GRIDS = ("even", "logit-normal")


def even_subset(items: Sequence, k: int) -> list:
    """k evenly spread entries of a sorted grid: every (len // k)-th, starting half a stride in."""
    stride = max(1, len(items) // k)
    return list(items[stride // 2::stride][:k])


class NoiseSchedule:
    """The grid of positions 0 .. T-1. Enough for strategies and replays (which need no model);
    the subclasses add the maps a model needs."""

    prediction_type = "epsilon"
    grid_kind = "even"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)
        self._tables: dict = {}  # float32 copies of the schedule's tables, one per device

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """The float64 table `name` as float32 on `device`, copied there once."""
        key = (name, str(device))
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(device=device, dtype=torch.float32)
        return self._tables[key]

    def grid(self, n: int, t_min: int = 0) -> list[int]:
        if self.grid_kind == "logit-normal":
            return logit_normal_timesteps(self.num_train_timesteps, n, t_min)
        return even_timesteps(self.num_train_timesteps, n, t_min)

    def with_grid(self, kind: str) -> NoiseSchedule:
        """The same schedule laying its grids by `kind`: even (the paper's) or logit-normal."""
        if kind not in GRIDS:
            raise UserError(f"unknown timestep grid {kind!r}; choose one of {', '.join(GRIDS)}")
        if kind == self.grid_kind:
            return self
        view = copy.copy(self)
        view.grid_kind = kind
        return view

    # ----- the maps a model needs (subclasses) ---------------------------------------------
    def alpha_bar(self, t: torch.Tensor | None = None) -> torch.Tensor:
        """Variance-preserving equivalent alpha_bar at positions t (all positions if None), float64."""
        raise NotImplementedError

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) of x_t = a_t x0 + b_t eps, float32, shaped [B, 1, 1, 1]."""
        raise NotImplementedError

    def to_epsilon(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The family's velocity target (VP: a eps - b x0, v-prediction's; flow: eps - x0)."""
        raise NotImplementedError

    # ----- derived, the same for every family ---------------------------------------------
    def log_snr(self, t: torch.Tensor | None = None) -> torch.Tensor:
        abar = self.alpha_bar(t)
        return torch.log(abar) - torch.log1p(-abar)

    def noise_levels(self) -> torch.Tensor:
        """sqrt((1 - abar) / abar) at every position: the noise-to-signal ratio (increasing in t)."""
        abar = self.alpha_bar()
        return ((1 - abar) / abar).sqrt()

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.scales(t.to(x0.device))
        return a * x0.float() + b * noise.float()

    def velocity_from_epsilon(self, eps_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity estimate implied by an epsilon estimate (through x0_hat = (x_t - b eps_hat) / a)."""
        a, b = self.scales(t.to(x_t.device))
        return self.velocity((x_t.float() - b * eps_hat) / a, eps_hat, t)

    def elbo_weights(self) -> torch.Tensor:
        """Per position, -d logSNR / dt normalised to mean 1: weighting errors at evenly spaced positions by
        it gives the ELBO's uniform-in-log-SNR integral (up to a constant) instead of uniform in t."""
        log_snr = self.log_snr()
        finite = torch.isfinite(log_snr)
        if not finite[1:-1].all() or finite.sum() < 3:
            raise UserError("the schedule's log-SNR is not finite inside its range; ELBO weights are undefined")
        # A flow schedule's last position is pure noise (sigma = 1, log-SNR = -inf): its weight would be
        # infinite and every other weight zero. Extend the log-SNR linearly there instead, so that
        # position weighs like its neighbour; the network's error at pure noise carries no class signal anyway.
        if not finite[0]:
            log_snr[0] = 2 * log_snr[1] - log_snr[2]
        if not finite[-1]:
            log_snr[-1] = 2 * log_snr[-2] - log_snr[-3]
        slope = -torch.gradient(log_snr)[0]
        return slope / slope.mean()


class VPSchedule(NoiseSchedule):
    """Variance-preserving (DDPM) schedules; the network takes the integer position as its timestep."""

    PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__(len(alphas_cumprod))
        if prediction_type not in self.PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type

    def alpha_bar(self, t=None):
        return self.alphas_cumprod if t is None else self.alphas_cumprod[t.cpu()]

    def model_timestep(self, t):
        return t

    def _abar32(self, t: torch.Tensor) -> torch.Tensor:
        return self._table("alphas_cumprod", t.device)[t].view(-1, 1, 1, 1)

    def scales(self, t):
        abar = self._abar32(t)
        return abar.sqrt(), (1 - abar).sqrt()

    def to_epsilon(self, prediction, x_t, t):
        if self.prediction_type == "epsilon":
            return prediction
        abar = self._abar32(t)
        x_t = x_t.float()
        if self.prediction_type == "v_prediction":  # eps - eps_hat = sqrt(abar) (v - v_hat)
            return abar.sqrt() * prediction + (1 - abar).sqrt() * x_t
        return (x_t - abar.sqrt() * prediction) / (1 - abar).sqrt()  # "sample": the network predicts x0

    def velocity(self, x0, noise, t):
        a, b = self.scales(t.to(x0.device))
        return a * noise.float() - b * x0.float()


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified flow (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - sigma) x0 + sigma eps,
    the network predicts v = eps - x0.

    Position t has sigma = shift s / (1 + (shift - 1) s) with s = (t + 1) / T, the scheduler's own
    training sigmas; the network's timestep input is sigma * timestep_scale (1000 for SD3; Flux's
    pipeline passes sigma and its adapter scales it). From a velocity v_hat:
    eps_hat = x_t + (1 - sigma) v_hat, so eps - eps_hat = (1 - sigma)(v - v_hat).
    """

    prediction_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, timestep_scale: float | None = None):
        super().__init__(num_train_timesteps)
        if shift <= 0:
            raise UserError(f"the flow schedule's shift must be positive, got {shift}")
        self.shift = float(shift)
        self.timestep_scale = float(timestep_scale if timestep_scale is not None else num_train_timesteps)
        s = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._table("sigmas", t.device)[t].view(-1, 1, 1, 1)

    def alpha_bar(self, t=None):
        sigma = self.sigmas if t is None else self.sigmas[t.cpu()]
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)

    def model_timestep(self, t):
        return self.sigma(t).flatten() * self.timestep_scale

    def scales(self, t):
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def to_epsilon(self, prediction, x_t, t):
        return x_t.float() + (1 - self.sigma(t)) * prediction

    def velocity(self, x0, noise, t):
        return noise.float() - x0.float()


def schedule_from_scheduler(scheduler: Any) -> NoiseSchedule:
    """The schedule a diffusers scheduler trains on (its class decides the family)."""
    config = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch"):
        if config.get("use_dynamic_shifting"):
            raise UserError("flow schedulers with resolution-dependent (dynamic) shifting are not supported yet")
        return RectifiedFlowSchedule(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))
    if not hasattr(scheduler, "alphas_cumprod"):
        raise UserError(f"scheduler {type(scheduler).__name__} has no alphas_cumprod and is not a flow-matching "
                        "scheduler; its noise schedule is not supported")
    return VPSchedule(scheduler.alphas_cumprod, config.get("prediction_type", "epsilon"))


def as_schedule(schedule: NoiseSchedule | int) -> NoiseSchedule:
    """Strategies and replays accept a bare T for the grid of a T-step schedule."""
    return schedule if isinstance(schedule, NoiseSchedule) else NoiseSchedule(int(schedule))

