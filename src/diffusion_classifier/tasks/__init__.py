"""Tasks an evaluation run can score: each a Task (base.py) in one module, imported when first asked for."""

from __future__ import annotations

from importlib import import_module

from ..errors import UserError

TASKS = {"classification": ".classification:ClassificationTask", "winoground": ".winoground:WinogroundTask",
         "pairs": ".caption_pairs:CaptionPairsTask"}


def get_task(name: str):
    """The Task called `name` (an instance)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(import_module(module, __name__), cls)()


def task_of(config: dict):
    """The Task of a stored run's configuration (runs stored before tasks were recorded are classification)."""
    return get_task(config.get("task", "classification"))
