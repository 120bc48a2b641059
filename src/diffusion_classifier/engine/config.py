"""One typed scoring configuration: the classifier takes it, the CLI builds its flags from it, and runs
store and compare its `describe()`.

Each field says once what it is (type, default, help, CLI flag); `describe()` holds every field that
can change a result, so a setting cannot be left out of a run's stored configuration. Fields marked
`affects_results=False` (batch sizes) change only speed, and runs may resume with other values.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from ..adapters.denoiser import LOSSES, TARGETS
from ..adapters.schedules import GRIDS
from ..errors import UserError
from .probabilities import AGGREGATES
from .strategies import Exhaustive, Strategy

INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "nearest")
# Settings added after runs were first stored: recorded (and compared) only when they differ from their
# default, so a run stored before they existed, which used the default, still resumes and replays.
RECORDED_WHEN_CHANGED = ("target", "grid", "weighting")


def option(default: Any, help: str, choices: tuple | None = None, affects_results: bool = True,
           group: str | None = None, **extra: Any) -> Any:
    """A config field with its CLI flag's help and choices (extra: argparse settings such as metavar).
    affects_results=False: the setting changes only speed or budget, so a run may resume with another value."""
    return field(default=default, metadata={"help": help, "choices": choices, "affects_results": affects_results,
                                            "group": group, **extra})


@dataclass(frozen=True)
class ScoringConfig:
    """How errors are measured and combined (not which candidates: labels and prompts are data)."""

    strategy: Strategy = field(default_factory=lambda: Exhaustive(25), metadata={"affects_results": True})
    loss: str | None = option(None, "error between true and predicted noise (default l2, or the preset's with "
                              "its schedule)", LOSSES)
    aggregate: str = option("min", "how a class's prompts combine: min (the paper) or mean of their mean errors",
                            AGGREGATES)
    target: str = option("eps", "what the error is taken on: eps (the paper's, every family on one footing) or "
                         "velocity (flow models: the eps error / (1 - sigma)^2; VP models: v-prediction's)", TARGETS)
    grid: str = option("even", "timestep grid: even (the paper's, over the training positions) or logit-normal "
                       "(SD3's training density)", GRIDS)
    weighting: str = option("uniform", "per-timestep weights: uniform in t (the paper's) or elbo (uniform in "
                            "log-SNR)", ("uniform", "elbo"))
    seed: int = option(0, "noise seed (same seed, same predictions)")
    interpolation: str = option("bicubic", "resize filter", INTERPOLATIONS)
    noise_aware: bool = option(False, "estimate each image's noise level and score only timesteps whose noise "
                               "level is at least --noise-margin times it", group="robustness")
    noise_margin: float = option(2.0, "with --noise-aware (default 2)", group="robustness")
    normalize_intensity: bool = option(False, "stretch each image's intensity range onto the training images' "
                                       "range (undoes contrast and brightness changes; for range-normalised "
                                       "data such as Fashion-MNIST)", group="robustness")
    batch_size: int | str = option("auto", "network evaluations per forward pass, or auto: 256 on the CPU; on CUDA "
                                   "what the free memory holds (at most 256), halved on running out of memory",
                                   affects_results=False)
    compile: bool = option(False, "torch.compile the network with one fixed batch shape (the last batch of a wave "
                           "is padded); compile time is reported; falls back to eager with a warning where it "
                           "cannot compile", affects_results=False)
    images_per_batch: int = option(32, "images scored together (and committed, in evaluate)", affects_results=False)

    def __post_init__(self):
        if not isinstance(self.strategy, Strategy):
            raise UserError(f"strategy must be a Strategy (Exhaustive, Staged, Elimination, ...), got "
                            f"{type(self.strategy).__name__}")
        if self.loss is None:
            object.__setattr__(self, "loss", "l2")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"unknown {f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        if self.noise_margin <= 0:
            raise UserError("the noise margin must be positive")
        if self.noise_margin != 2.0 and not self.noise_aware:
            raise UserError("--noise-margin is used by --noise-aware scoring only: add --noise-aware, or leave it out")
        if isinstance(self.batch_size, str) and self.batch_size.isdigit():
            object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UserError(f"--batch-size must be at least 1, or auto; got {self.batch_size!r}")
        if self.images_per_batch < 1:
            raise UserError("--images-per-batch must be at least 1")

    @classmethod
    def from_options(cls, **options) -> ScoringConfig:
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"unknown scoring option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    def with_options(self, **options) -> ScoringConfig:
        return replace(self, **options)

    @classmethod
    def from_description(cls, description: dict, **speed) -> ScoringConfig:
        """The configuration a describe() came from: a stored run's configuration (which holds one) or a
        calibration's. Settings recorded as None (inactive, or at a default recorded only when changed) take
        their defaults; keys that are not scoring settings (labels, model, ...) are ignored; `speed`: settings
        that change only speed (batch_size, compile, images_per_batch)."""
        from .strategies import strategy_from_description

        values = {}
        for f in fields(cls):
            value = description.get(f.name)
            if not f.metadata.get("affects_results", True) or value is None:
                continue
            values[f.name] = strategy_from_description(value) if f.name == "strategy" else value
        return cls(**values, **speed)

    def to_dict(self) -> dict:
        """Every setting, speed ones included, as plain JSON values (from_dict reads it back)."""
        return {f.name: (getattr(self, f.name).describe() if f.name == "strategy" else getattr(self, f.name))
                for f in fields(self)}

    @classmethod
    def from_dict(cls, values: dict) -> ScoringConfig:
        speed = {f.name: values[f.name] for f in fields(cls)
                 if not f.metadata.get("affects_results", True) and f.name in values}
        return cls.from_description(values, **speed)

    def describe(self) -> dict:
        """Every setting that can change a result; settings that are inactive are recorded as None."""
        out = {}
        for f in fields(self):
            if not f.metadata.get("affects_results", True):
                continue
            value = getattr(self, f.name)
            out[f.name] = value.describe() if isinstance(value, Strategy) else value
        if not self.noise_aware:
            out["noise_margin"] = None  # unused without noise-aware scoring
        for name in RECORDED_WHEN_CHANGED:
            if out[name] == next(f.default for f in fields(self) if f.name == name):
                out[name] = None
        return out


# ----- the CLI's flags, built from the fields -----------------------------------------------------

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(groups: dict[str, argparse._ArgumentGroup], cls: type = ScoringConfig,
                  default_group: str = "scoring") -> None:
    """One flag per field of the dataclass `cls` that has help, in its named argument group."""
    for f in fields(cls):
        if "help" not in f.metadata:
            continue
        group = groups[f.metadata.get("group") or default_group]
        if f.type in ("bool", bool):
            group.add_argument(flag(f.name), action="store_true", help=f.metadata["help"])
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        default = f.default if f.default is not MISSING else None
        extra = {"metavar": f.metadata["metavar"]} if "metavar" in f.metadata else {}
        group.add_argument(flag(f.name), type=kind, default=default, choices=f.metadata.get("choices"),
                           help=f.metadata["help"], **extra)


def arguments_of(args: argparse.Namespace, cls: type = ScoringConfig) -> dict:
    """The values of the flags `add_arguments` made for `cls`, by field name."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if "help" in f.metadata}


def from_arguments(args: argparse.Namespace, cls: type = ScoringConfig, **given):
    """The dataclass `cls` from the parsed flags of its fields (plus fields given directly)."""
    return cls(**arguments_of(args, cls), **given)
