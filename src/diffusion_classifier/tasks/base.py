"""What a task is to an evaluation run.

A task says what its items are (labelled images, Winoground examples, caption pairs), how a batch of them is
scored into stored rows (store.Row), and what the stored rows add up to: metrics, the lines `evaluate`
prints, a report, and the choices a temperature is fitted on. runs.py drives every task through one
resumable loop, and `report` and `calibrate` read every task's runs through the same methods, so a new task
is one module with a Task subclass, named in tasks/__init__.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..store import Row


class Task:
    name: str = ""
    unit: str = "image"  # what one stored row is ("image" or "example"): metrics count "<unit>s"
    options: tuple[str, ...] = ()  # the EvaluationRun fields only some tasks take that this one does

    @property
    def phrase(self) -> str:
        """How messages name the task (as the flag that chooses it)."""
        return f"--task {self.name}"

    # --- running -------------------------------------------------------------------------------------------
    def load_items(self, run) -> Sequence:
        raise NotImplementedError

    def item_ids(self, items: Sequence) -> list[str]:
        raise NotImplementedError

    def identity(self, run, items: Sequence) -> dict:
        """The stored configuration's keys that name the item list (besides model, data and weights)."""
        raise NotImplementedError

    def check(self, run, items: Sequence) -> None:
        """What can be refused before the model loads."""

    def scorer(self, run, items: Sequence, denoiser, scoring):
        """The object that scores this task's batches; its describe() joins the run's identity."""
        raise NotImplementedError

    def batch_size(self, scoring) -> int:
        return scoring.images_per_batch

    def prepare(self, scorer, items: Sequence, batch: list[int]) -> Any:
        """Work for one batch that can run in a background thread while the previous batch is scored."""
        return None

    def score(self, scorer, items: Sequence, batch: list[int], prepared: Any) -> list[Row]:
        raise NotImplementedError

    # --- reading stored rows --------------------------------------------------------------------------------
    def metrics(self, rows: list[Row]) -> dict:
        raise NotImplementedError

    def summary(self, metrics: dict, seconds: float) -> list[str]:
        """What `evaluate` prints at the end."""
        raise NotImplementedError

    def report(self, run_dir: Path, config: dict, rows: list[Row], aggregate: str | None = None, t_min: int = 0,
               t_max: int | None = None, plots: bool = True) -> dict:
        raise NotImplementedError

    def report_lines(self, report: dict) -> list[str]:
        raise NotImplementedError

    def choices(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        """For calibration: per decision, every option's error minus the best option's ([decisions, options]),
        and the index of the right option."""
        raise NotImplementedError

    def timestep_gaps(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """For per-timestep calibration: ([decisions, options, timesteps] gaps, right options, timesteps)."""
        raise UserError(f"per-timestep calibration applies to classification runs; this is a {self.name} run")

    def error_grids(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, list[int]]:
        """For fitting a first look: ([images, candidates, prompts, timesteps] errors, the common timesteps)."""
        raise UserError(f"a first look is fitted on classification runs with many candidates; this is a "
                        f"{self.name} run")


def digest(ids: Sequence) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def within(timesteps: Sequence[int], t_min: int = 0, t_max: int | None = None) -> np.ndarray:
    """Which of these timesteps lie in [t_min, t_max]."""
    ts = np.asarray(timesteps)
    return (ts >= t_min) & (ts <= (t_max if t_max is not None else ts.max(initial=0)))
