"""The scoring engine: runs strategies for many jobs at once, in shared network batches.

A job is one image (its clean sample x0 and a noise key) with its own candidate condition rows: rows of
the engine's embedded condition bank, [candidates, prompts], and optionally a null row (the empty prompt)
whose error is measured at every (t, eps) pair any candidate is, for unconditional normalisation.
Classification gives every image the same rows; caption ranking gives each image its texts.

For each job, every candidate is scored with the same (t, eps) pairs (a paired comparison). The noise
used at timestep t comes from a generator seeded by (noise key, t); the key is derived from the image's
content and the user's seed, so results do not depend on batch size, on which images share a batch, on
the number of processes or on image order; and two strategies that evaluate the same (candidate, t) of
an image get the same error there, so their results are paired too (and a stored exhaustive run can
replay any strategy on its grid exactly). Explicit noise follows the original code's layout instead:
entry i goes with the i-th distinct timestep evaluated.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import robust
from .denoisers import Conditions, Denoiser
from .errors import UserError
from .strategies import Round, ScoreTable, Strategy

if TYPE_CHECKING:
    from .config import ScoringConfig

NULL = -1  # the candidate index of a job's null row in a work item
WEIGHTINGS = ("uniform", "elbo")


def _hash_to_seed(*parts: bytes) -> int:
    digest = hashlib.sha256(b"\x00".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_seed(seed: int, pixels: torch.Tensor) -> int:
    """A noise key tied to the image's content (its preprocessed pixels) and the user's seed."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return _hash_to_seed(str(seed).encode(), data)


def noise_for(seed: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise an image (its key from image_seed) gets at timestep t."""
    generator = torch.Generator().manual_seed(_hash_to_seed(str(seed).encode(), str(t).encode()))
    return torch.randn(tuple(shape), generator=generator)


@dataclass
class Job:
    """One image to score against its own candidates."""

    x0: torch.Tensor  # [C, H, W] on the model's device
    noise_key: int
    rows: np.ndarray  # [candidates, prompts] rows of the engine's condition bank
    null_row: int | None = None
    t_min: int = 0
    explicit_noise: torch.Tensor | None = None


def check_robust_options(denoiser: Denoiser, config: ScoringConfig) -> None:
    """Refuse robust options where they do not apply (before any model work)."""
    if config.noise_aware and denoiser.vae is not None:
        raise UserError("noise-aware scoring is defined for pixel-space models; for latent models (Stable "
                        "Diffusion, DiT) the pixel noise level does not map to a latent one (see README)")
    if config.normalize_intensity and not denoiser.info.intensity_stats:
        raise UserError("this model has no stored intensity statistics, so it cannot normalise intensities")


def prepare_images(denoiser: Denoiser, config: ScoringConfig, pixels: torch.Tensor, rows: np.ndarray,
                   null_row: int | None = None, noise: Sequence | None = None) -> list[Job]:
    """Preprocessed images ([B, C, H, W] in [-1, 1]) -> one Job each, with the config's robust options
    applied; the noise key follows the pixels the model scores (after intensity normalisation)."""
    if config.normalize_intensity:
        pixels = robust.normalize_intensity(pixels, denoiser.info.intensity_stats)
    t_mins = [0] * len(pixels)
    if config.noise_aware:  # after normalisation: the level the model sees
        sigma = robust.estimate_noise_sigma(pixels)
        t_mins = robust.min_timestep_for(sigma, denoiser.schedule, config.noise_margin).tolist()
    x0 = denoiser.encode_images(pixels)
    return [Job(x0[i], image_seed(config.seed, pixels[i]), rows, null_row, int(t_mins[i]),
                None if noise is None or noise[i] is None else torch.as_tensor(noise[i]).to(x0.device))
            for i in range(len(x0))]


@dataclass
class _Running:
    job: Job
    table: ScoreTable
    rounds: Iterator[Round]
    noise_cache: dict = field(default_factory=dict)
    done: bool = False

    def noise(self, column: int, t: int) -> torch.Tensor:
        if column not in self.noise_cache:
            explicit = self.job.explicit_noise
            if explicit is not None:
                if column >= len(explicit):
                    raise UserError(f"explicit noise has {len(explicit)} entries but the strategy "
                                    f"evaluates more distinct timesteps than that")
                self.noise_cache[column] = explicit[column]
            else:
                self.noise_cache[column] = noise_for(self.job.noise_key, t, self.job.x0.shape)
        return self.noise_cache[column]


@dataclass
class EngineStats:
    network_seconds: float = 0.0
    network_calls: int = 0
    evaluations: int = 0


class ScoringEngine:
    """Scores jobs against rows of one embedded condition bank (conditions: one row per condition)."""

    def __init__(self, denoiser: Denoiser, conditions: Conditions, loss: str = "l2", batch_size: int = 256,
                 target: str = "eps", grid: str = "even", weighting: str = "uniform"):
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown timestep weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.denoiser, self.conditions = denoiser, conditions
        self.loss, self.batch_size, self.target = loss, batch_size, target
        self.schedule = denoiser.schedule.with_grid(grid)
        # ELBO weighting multiplies each error by -dlogSNR/dt at its position (mean 1 over the schedule)
        self.weights = denoiser.schedule.elbo_weights().float() if weighting == "elbo" else None
        self.stats = EngineStats()

    @classmethod
    def for_config(cls, denoiser: Denoiser, conditions: Conditions, config: ScoringConfig) -> ScoringEngine:
        return cls(denoiser, conditions, config.loss, config.batch_size, config.target, config.grid, config.weighting)

    def score(self, jobs: Sequence[Job], strategy: Strategy, aggregate: str = "min") -> list[ScoreTable]:
        """Run `strategy` for every job; one ScoreTable per job, in order."""
        running = []
        for job in jobs:
            n_candidates, n_prompts = np.shape(job.rows)
            table = ScoreTable(n_candidates, n_prompts, job.t_min, with_null=job.null_row is not None)
            running.append(_Running(job, table, strategy.rounds(table, self.schedule, aggregate)))
        while True:
            work = []
            for run in running:
                if run.done:
                    continue
                try:
                    work.append((run, next(run.rounds)))
                except StopIteration:
                    run.done = True
                    run.noise_cache.clear()  # finished images release their noise (large for latent models)
            if not work:
                return [run.table for run in running]
            self._evaluate(work)

    def _evaluate(self, work: list[tuple[_Running, Round]]) -> None:
        """Evaluate every (job, candidate, prompt, timestep) item of this wave in shared batches."""
        items = []  # (run, condition row, t, column, candidate or NULL, prompt)
        for run, round_ in work:
            table, rows = run.table, run.job.rows
            columns = [(t, table.column(t)) for t in round_.timesteps]
            for c in round_.classes:
                for p in range(rows.shape[1]):
                    for t, col in columns:
                        if np.isnan(table.errors[c, p, col]):
                            items.append((run, int(rows[c, p]), t, col, c, p))
            if run.job.null_row is not None:
                items += [(run, run.job.null_row, t, col, NULL, 0) for t, col in columns
                          if np.isnan(table.null_errors[col])]
        device = self.denoiser.device
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            x0 = torch.stack([run.job.x0 for run, *_ in chunk])
            noise = torch.stack([run.noise(col, t) for run, _, t, col, _, _ in chunk]).to(device)
            t = torch.tensor([item[2] for item in chunk], device=device)
            rows = torch.tensor([item[1] for item in chunk], device=device)
            cond = {key: value[rows] for key, value in self.conditions.items()}
            started = time.perf_counter()
            errors = self.denoiser.error(x0, noise, t, cond, self.loss, self.target).cpu()
            if self.weights is not None:
                errors = errors * self.weights[t.cpu()]
            errors = errors.numpy()
            self.stats.network_seconds += time.perf_counter() - started
            self.stats.network_calls += 1
            self.stats.evaluations += len(chunk)
            for (run, _, _, col, c, p), value in zip(chunk, errors):
                if c == NULL:
                    run.table.null_errors[col] = value
                else:
                    run.table.errors[c, p, col] = value
