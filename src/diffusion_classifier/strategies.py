"""Which (class, timestep) pairs to evaluate, and in what order.

A strategy is a generator over rounds. Each round names classes and timesteps; the
engine evaluates every (class, prompt, timestep) combination of the round for one
image, writes the errors into the image's `ScoreTable`, and asks for the next round.
Decisions between rounds read the table, so strategies never touch the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class Round:
    classes: tuple[int, ...]
    timesteps: tuple[int, ...]


class ScoreTable:
    """Errors measured for one image: errors[class, prompt, column], NaN where not evaluated.

    Columns are the distinct timesteps in the order they were first evaluated; the
    column index is also the noise index (the i-th distinct timestep evaluated for an
    image uses noise i, as in the original implementation's saved-noise layout).
    """

    def __init__(self, n_classes: int, n_prompts: int):
        self.errors = np.full((n_classes, n_prompts, 0), np.nan)
        self.timesteps: list[int] = []
        self._column_of: dict[int, int] = {}

    @property
    def n_classes(self) -> int:
        return self.errors.shape[0]

    def column(self, t: int) -> int:
        if t not in self._column_of:
            self._column_of[t] = len(self.timesteps)
            self.timesteps.append(t)
            pad = np.full(self.errors.shape[:2] + (1,), np.nan)
            self.errors = np.concatenate([self.errors, pad], axis=2)
        return self._column_of[t]

    @property
    def nfe(self) -> int:
        return int(np.isfinite(self.errors).sum())

    def evaluated_counts(self) -> np.ndarray:
        """Number of timesteps evaluated per class."""
        return np.isfinite(self.errors[:, 0, :]).sum(axis=1)

    def class_scores(self, aggregate: str = "min") -> np.ndarray:
        """Mean error over evaluated timesteps per (class, prompt), then min or mean over prompts."""
        counts = np.isfinite(self.errors).sum(axis=2)
        sums = np.nansum(self.errors, axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_prompt = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        if aggregate == "min":
            return per_prompt.min(axis=1)
        if aggregate == "mean":
            return per_prompt.mean(axis=1)
        raise UserError(f"unknown prompt aggregation {aggregate!r}; choose min or mean")

    def ranking(self, aggregate: str = "min") -> np.ndarray:
        """Class indices best first: classes that survived longer first, then by lower mean error."""
        scores = np.nan_to_num(self.class_scores(aggregate), nan=np.inf)
        return np.lexsort((scores, -self.evaluated_counts()))


def even_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """The paper's grid: range(T // n // 2, T, T // n), first n entries."""
    if not 1 <= n <= num_train_timesteps:
        raise UserError(f"number of timesteps must lie in [1, {num_train_timesteps}], got {n}")
    step = num_train_timesteps // n
    return list(range(step // 2, num_train_timesteps, step))[:n]


class Strategy:
    loss: str | None = None  # a preset may carry its paper loss

    def rounds(self, table: ScoreTable, num_train_timesteps: int, aggregate: str) -> Iterator[Round]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class Exhaustive(Strategy):
    """Every candidate at n evenly spaced timesteps."""

    def __init__(self, n_timesteps: int = 25):
        self.n_timesteps = int(n_timesteps)

    def rounds(self, table, num_train_timesteps, aggregate):
        yield Round(tuple(range(table.n_classes)), tuple(even_timesteps(num_train_timesteps, self.n_timesteps)))

    def describe(self):
        return {"name": "exhaustive", "n_timesteps": self.n_timesteps}


class FixedTimesteps(Strategy):
    """Every candidate at the given timesteps (ablations, or a grid of your own)."""

    def __init__(self, timesteps: Sequence[int]):
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or len(set(self.timesteps)) != len(self.timesteps):
            raise UserError("timesteps must be a non-empty list without repeats")

    def rounds(self, table, num_train_timesteps, aggregate):
        if not all(0 <= t < num_train_timesteps for t in self.timesteps):
            raise UserError(f"timesteps must lie in [0, {num_train_timesteps})")
        yield Round(tuple(range(table.n_classes)), tuple(self.timesteps))

    def describe(self):
        return {"name": "fixed", "timesteps": self.timesteps}


class Staged(Strategy):
    """The paper's adaptive schedule: stage i scores the remaining candidates at n_samples[i]
    timesteps, then keeps the to_keep[i] best.

    Stage grids follow the original code: the finest grid has max(n_samples) points,
    stage i takes every (len // n_i)-th point of it starting at (len // n_i // 2),
    and skips timesteps already evaluated, so NFE equals the original's.
    """

    def __init__(self, n_samples: Sequence[int], to_keep: Sequence[int], loss: str | None = None):
        n_samples, to_keep = [int(n) for n in n_samples], [int(k) for k in to_keep]
        if not n_samples or len(n_samples) != len(to_keep):
            raise UserError("--n-samples and --to-keep need the same (non-zero) number of stages")
        if to_keep[-1] != 1:
            raise UserError("the last --to-keep entry must be 1 (one prediction)")
        if any(a < b for a, b in zip(to_keep, to_keep[1:])) or min(n_samples) < 1:
            raise UserError("--to-keep must not increase between stages and --n-samples must be positive")
        self.n_samples, self.to_keep, self.loss = n_samples, to_keep, loss

    def stage_timesteps(self, num_train_timesteps: int) -> list[list[int]]:
        """The new timesteps each stage evaluates (before any candidate is pruned)."""
        finest = even_timesteps(num_train_timesteps, max(self.n_samples))
        seen: set[int] = set()
        stages = []
        for n in self.n_samples:
            stride = max(1, len(finest) // n)
            grid = [t for t in finest[stride // 2::stride][:n] if t not in seen]
            seen.update(grid)
            stages.append(grid)
        return stages

    def expected_nfe(self, n_classes: int, num_train_timesteps: int, n_prompts: int = 1) -> int:
        remaining, total = n_classes, 0
        for grid, keep in zip(self.stage_timesteps(num_train_timesteps), self.to_keep):
            total += remaining * len(grid) * n_prompts
            remaining = min(remaining, keep)
        return total

    def rounds(self, table, num_train_timesteps, aggregate):
        remaining = list(range(table.n_classes))
        for grid, keep in zip(self.stage_timesteps(num_train_timesteps), self.to_keep):
            if grid:
                yield Round(tuple(remaining), tuple(grid))
            scores = table.class_scores(aggregate)[remaining]
            order = np.argsort(scores, kind="stable")[:keep]
            remaining = [remaining[i] for i in order]

    def describe(self):
        return {"name": "staged", "n_samples": self.n_samples, "to_keep": self.to_keep}


# The paper's per-dataset schedules (to_keep, n_samples, loss).
PRESETS: dict[str, tuple[list[int], list[int], str]] = {
    "cifar10": ([5, 1], [50, 500], "l1"),
    "pets": ([5, 1], [25, 250], "l1"),
    "stl10": ([5, 1], [100, 500], "l1"),
    "food": ([20, 10, 5, 1], [20, 50, 100, 500], "l2"),
    "aircraft": ([20, 10, 5, 1], [20, 50, 100, 500], "l2"),
    "flowers": ([20, 10, 5, 1], [20, 50, 100, 500], "l1"),
    "imagenet": ([500, 50, 10, 1], [50, 100, 500, 1000], "l2"),
    "objectnet": ([25, 10, 5, 1], [50, 100, 500, 1000], "l2"),
}


def preset(name: str) -> Staged:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    to_keep, n_samples, loss = PRESETS[name]
    return Staged(n_samples, to_keep, loss=loss)
