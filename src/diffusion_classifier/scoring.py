"""The scoring engine: runs strategies for many images at once, in shared network batches.

For each image, every candidate is scored with the same (t, eps) pairs (a paired
comparison). The noise used at timestep t comes from a generator seeded by (seed, image
content, t), so results do not depend on batch size, on which images share a batch, on the
number of processes or on image order; and two strategies that evaluate the same (class, t)
of an image get the same error there, so their results are paired too (and a stored
exhaustive run can replay any strategy on its grid exactly). Explicit noise follows the
original code's layout instead: entry i goes with the i-th distinct timestep evaluated.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .denoisers import Conditions, Denoiser
from .errors import UserError
from .strategies import Round, ScoreTable, Strategy


def _hash_to_seed(*parts: bytes) -> int:
    digest = hashlib.sha256(b"\x00".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_seed(seed: int, pixels: torch.Tensor) -> int:
    """A seed tied to the image's content (its preprocessed pixels) and the user's seed."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return _hash_to_seed(str(seed).encode(), data)


def noise_for(seed: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise an image (its seed from image_seed) gets at timestep t."""
    generator = torch.Generator().manual_seed(_hash_to_seed(str(seed).encode(), str(t).encode()))
    return torch.randn(tuple(shape), generator=generator)


@dataclass
class _ImageJob:
    x0: torch.Tensor  # [C, H, W] on the model's device
    seed: int
    table: ScoreTable
    rounds: object  # the strategy's generator
    explicit_noise: torch.Tensor | None
    noise_cache: dict = field(default_factory=dict)
    done: bool = False

    def noise(self, column: int, t: int) -> torch.Tensor:
        if column not in self.noise_cache:
            if self.explicit_noise is not None:
                if column >= len(self.explicit_noise):
                    raise UserError(f"explicit noise has {len(self.explicit_noise)} entries but the strategy "
                                    f"evaluates more distinct timesteps than that")
                self.noise_cache[column] = self.explicit_noise[column]
            else:
                self.noise_cache[column] = noise_for(self.seed, t, self.x0.shape)
        return self.noise_cache[column]


@dataclass
class EngineStats:
    network_seconds: float = 0.0
    network_calls: int = 0
    evaluations: int = 0


class ScoringEngine:
    """Scores images against a fixed set of candidate conditions.

    conditions: embedded conditions with n_classes * n_prompts rows, row c * n_prompts + p
    being prompt p of class c (class-conditional models have n_prompts = 1).
    """

    def __init__(self, denoiser: Denoiser, conditions: Conditions, n_classes: int, n_prompts: int,
                 strategy: Strategy, loss: str = "l2", aggregate: str = "min", seed: int = 0,
                 batch_size: int = 256):
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        self.denoiser, self.conditions = denoiser, conditions
        self.n_classes, self.n_prompts = n_classes, n_prompts
        self.strategy, self.loss, self.aggregate = strategy, loss, aggregate
        self.seed, self.batch_size = seed, batch_size
        self.stats = EngineStats()

    def score(self, x0: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None,
              seeds: Sequence[int] | None = None, t_mins: Sequence[int] | None = None) -> list[ScoreTable]:
        """x0: [N, C, H, W] clean samples in the model's space -> one ScoreTable per image.

        t_mins: per image, the smallest timestep the strategy may use (noise-aware scoring)."""
        T = self.denoiser.num_train_timesteps
        jobs = []
        for i in range(len(x0)):
            table = ScoreTable(self.n_classes, self.n_prompts, 0 if t_mins is None else int(t_mins[i]))
            explicit = None if noise is None or noise[i] is None else torch.as_tensor(noise[i]).to(x0.device)
            seed = seeds[i] if seeds is not None else image_seed(self.seed, x0[i])
            jobs.append(_ImageJob(x0[i], seed, table, self.strategy.rounds(table, T, self.aggregate), explicit))
        while True:
            work = []
            for job in jobs:
                if job.done:
                    continue
                try:
                    work.append((job, next(job.rounds)))
                except StopIteration:
                    job.done = True
                    job.noise_cache.clear()  # finished images release their noise (large for latent models)
            if not work:
                return [job.table for job in jobs]
            self._evaluate(work)

    def _evaluate(self, work: list[tuple[_ImageJob, Round]]) -> None:
        """Evaluate every (image, class, prompt, timestep) item of this wave in shared batches."""
        items = []  # (job, condition row, t, column, class, prompt)
        for job, round_ in work:
            columns = [(t, job.table.column(t)) for t in round_.timesteps]
            for c in round_.classes:
                for p in range(self.n_prompts):
                    row = c * self.n_prompts + p
                    for t, col in columns:
                        if np.isnan(job.table.errors[c, p, col]):
                            items.append((job, row, t, col, c, p))
        device = self.denoiser.device
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            x0 = torch.stack([job.x0 for job, *_ in chunk])
            noise = torch.stack([job.noise(col, t) for job, _, t, col, _, _ in chunk]).to(device)
            t = torch.tensor([item[2] for item in chunk], device=device)
            rows = torch.tensor([item[1] for item in chunk], device=device)
            cond = {key: value[rows] for key, value in self.conditions.items()}
            started = time.perf_counter()
            errors = self.denoiser.error(x0, noise, t, cond, self.loss).cpu().numpy()
            self.stats.network_seconds += time.perf_counter() - started
            self.stats.network_calls += 1
            self.stats.evaluations += len(chunk)
            for (job, _, _, col, c, p), value in zip(chunk, errors):
                job.table.errors[c, p, col] = value
