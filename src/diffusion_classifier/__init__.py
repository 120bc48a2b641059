"""diffusion-classifier: zero-shot image classification with conditional diffusion models."""

from ._version import __version__
from .classifier import Classification, DiffusionClassifier
from .config import ScoringConfig
from .denoisers import Denoiser
from .errors import UserError
from .loading import load_denoiser
from .matching import ImageTextMatcher
from .presets import DatasetPreset, preset
from .runs import EvaluationRun, run_evaluation
from .strategies import CoarseToFine, Elimination, Exhaustive, FixedTimesteps, Staged

__all__ = ["__version__", "Classification", "CoarseToFine", "DatasetPreset", "Denoiser", "DiffusionClassifier",
           "Elimination", "EvaluationRun", "Exhaustive", "FixedTimesteps", "ImageTextMatcher", "ScoringConfig",
           "Staged", "UserError", "load_denoiser", "preset", "run_evaluation"]
