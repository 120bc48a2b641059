"""Replay a strategy on stored errors, without the model.

Noise is keyed by (image, timestep), so an exhaustive run over a grid holds exactly the errors any
strategy would measure at those (class, t) pairs: replaying a strategy whose timesteps lie on that
grid gives the same decisions and NFE as running it. Benchmarks use this to compare many strategies
and settings for the cost of one exhaustive pass.
"""

from __future__ import annotations

import numpy as np

from ..adapters.schedules import NoiseSchedule, as_schedule
from ..errors import UserError
from .strategies import ScoreTable, Strategy


def replay(strategy: Strategy, errors: np.ndarray, timesteps: list[int], schedule: NoiseSchedule | int = 1000,
           aggregate: str = "min", t_min: int = 0, candidates: list[int] | None = None) -> ScoreTable:
    """Run `strategy` against stored errors [classes, prompts, columns] measured at `timesteps`.

    `schedule`: the model's noise schedule, or its number of training timesteps (the grid is all a
    strategy needs). `candidates`: the rows the strategy starts from (default all; a first look's
    shortlist made elsewhere, as a low-resolution look's)."""
    column_of = {int(t): i for i, t in enumerate(timesteps)}
    table = ScoreTable(errors.shape[0], errors.shape[1], t_min)
    for round_ in strategy.rounds(table, as_schedule(schedule), aggregate, candidates):
        missing = [t for t in round_.timesteps if t not in column_of]
        if missing:
            raise UserError(f"the stored run has no errors at timesteps {missing[:5]}; replay needs a strategy "
                            "whose timesteps lie on the stored grid")
        classes = list(round_.classes)
        for t in round_.timesteps:
            column = table.column(t)  # first: it may grow the table
            table.record(classes, slice(None), column, errors[classes, :, column_of[t]])
    return table
