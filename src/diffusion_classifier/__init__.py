"""diffusion-classifier: zero-shot image classification with conditional diffusion models."""

__version__ = "0.1.0"

from .classifier import Classification, DiffusionClassifier  # noqa: E402
from .config import ScoringConfig  # noqa: E402
from .denoisers import Denoiser  # noqa: E402
from .errors import UserError  # noqa: E402
from .loading import load_denoiser  # noqa: E402
from .presets import DatasetPreset, preset  # noqa: E402
from .strategies import Elimination, Exhaustive, FixedTimesteps, Staged  # noqa: E402

__all__ = ["Classification", "DatasetPreset", "Denoiser", "DiffusionClassifier", "Elimination", "Exhaustive",
           "FixedTimesteps", "ScoringConfig", "Staged", "UserError", "load_denoiser", "preset"]
