"""diffusion-classifier: zero-shot image classification with conditional diffusion models."""

from ._version import __version__
from .adapters.denoiser import Denoiser
from .adapters.loading import load_denoiser
from .engine.config import ScoringConfig
from .engine.strategies import CoarseToFine, Elimination, Exhaustive, FixedTimesteps, Staged
from .errors import UserError
from .runs import EvaluationRun, run_evaluation
from .tasks.classifier import Classification, DiffusionClassifier
from .tasks.matching.matcher import ImageTextMatcher
from .tasks.presets import DatasetPreset, preset

__all__ = ["__version__", "Classification", "CoarseToFine", "DatasetPreset", "Denoiser", "DiffusionClassifier",
           "Elimination", "EvaluationRun", "Exhaustive", "FixedTimesteps", "ImageTextMatcher", "ScoringConfig",
           "Staged", "UserError", "load_denoiser", "preset", "run_evaluation"]
