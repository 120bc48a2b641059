"""diffusion-classifier: zero-shot image classification with conditional diffusion models."""

from ._version import __version__
from .adapters.denoiser import Denoiser
from .adapters.loading import load_denoiser
from .engine.config import ScoringConfig
from .engine.shortlists import fit_cascade
from .engine.strategies import Cascade, CoarseToFine, Elimination, Exhaustive, FixedTimesteps, Staged
from .errors import UserError
from .runs import EvaluationRun, run_evaluation
from .tasks.classifier import Classification, DiffusionClassifier
from .tasks.matching.matcher import ImageTextMatcher
from .tasks.presets import DatasetPreset, preset

__all__ = ["__version__", "Cascade", "Classification", "CoarseToFine", "DatasetPreset", "Denoiser",
           "DiffusionClassifier", "Elimination", "EvaluationRun", "Exhaustive", "FixedTimesteps", "ImageTextMatcher",
           "ScoringConfig", "Staged", "UserError", "fit_cascade", "load_denoiser", "preset", "run_evaluation"]
