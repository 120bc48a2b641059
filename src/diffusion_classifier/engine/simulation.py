"""Simulated error tables for checking a strategy's promise without a model.

Elimination promises to drop the candidate exhaustive scoring would pick with probability at most its
error rate. `dropped_winner_rate` measures that on errors drawn by `simulated_errors`, which are shaped
like denoising errors where it matters for the promise: a level per timestep shared by all candidates
(paired gaps cancel it), gaps whose scale peaks at mid-range timesteps, heavy-tailed noise (Student's t
with 3 degrees of freedom), and a group of candidates tied in expectation with the best, so which one
exhaustive picks is down to the noise (the hard case for an elimination test).
"""

from __future__ import annotations

import numpy as np

from ..adapters.schedules import as_schedule
from .replay import replay
from .strategies import Strategy


def simulated_errors(rng: np.random.Generator, n_candidates: int, n_tied: int, grid_size: int = 50) -> np.ndarray:
    """[candidates, 1, grid_size] errors; the first n_tied candidates are tied in expectation with the best."""
    j = np.arange(grid_size)
    scale = 0.2 + np.exp(-((j / grid_size - 0.3) / 0.16) ** 2)
    offset = np.concatenate([np.zeros(n_tied), rng.uniform(0.05, 1.0, n_candidates - n_tied)])
    noise = rng.standard_t(3, (n_candidates, grid_size)) / np.sqrt(3)
    return (5 + j / grid_size + (offset[:, None] + noise) * scale)[:, None, :]


def dropped_winner_rate(strategy: Strategy, n_candidates: int, n_tied: int, repeats: int, seed: int = 0,
                        grid_size: int = 50) -> tuple[float, float]:
    """(share of simulated images whose exhaustive winner the strategy does not pick, mean NFE as a share of
    exhaustive's), the strategy replayed on an even grid of grid_size timesteps out of 1,000."""
    rng = np.random.default_rng(seed)
    grid = as_schedule(1000).grid(grid_size, 0)
    misses, cost = 0, 0.0
    for _ in range(repeats):
        errors = simulated_errors(rng, n_candidates, n_tied, grid_size)
        table = replay(strategy, errors, grid)
        misses += int(table.ranking()[0] != errors[:, 0].mean(axis=1).argmin())
        cost += table.nfe / errors.size
    return misses / repeats, cost / repeats
