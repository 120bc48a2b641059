"""A first look at a lower resolution, for latent models: every candidate scored on a smaller encoding of the
image, a conformal shortlist from it, then the strategy's rounds at the model's own resolution among the
shortlist.

A latent network's cost grows with the latent's area, so at half the side an evaluation costs about a quarter.
The look's errors are not comparable with the full-resolution ones (another latent, other noise), so they never
enter the full-resolution table: only the shortlist and the evidence of the dropped candidates carry over. The
look's promise is about exhaustive scoring at the model's own resolution, so it is fitted on errors scored at
the low resolution against that scoring's winners: fit_first_look(low_errors, grid, winners=..., resolution=r),
or `calibrate RUN --first-look K --look-run LOW_RUN`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters.denoiser import Conditions, Denoiser
from ..errors import UserError
from .config import ScoringConfig
from .scoring import ScoringEngine, prepare_images
from .shortlists import FirstLook
from .strategies import FixedTimesteps


@dataclass
class LookResult:
    shortlist: list[int]  # candidate rows kept
    nfe: int  # network evaluations the look spent (each at the low resolution)
    evidence: dict[int, dict]  # per dropped candidate: its relative gap and what dropped it


class LowResolutionLook:
    """Runs `look` (a FirstLook with a resolution) for a denoiser at its own resolution: a twin of the denoiser
    at look.resolution (sharing its networks and `conditions`) scores every candidate at the look's timesteps."""

    def __init__(self, denoiser: Denoiser, conditions: Conditions, config: ScoringConfig, look: FirstLook):
        if look.resolution is None:
            raise ValueError("a LowResolutionLook needs a first look with a resolution")
        self.denoiser = denoiser.at_resolution(look.resolution)  # one line of refusal for one-size networks
        if look.resolution >= min(denoiser.image_size):
            raise UserError(f"the first look scores at {look.resolution} px, not below this model's "
                            f"{min(denoiser.image_size)} px: nothing to save")
        self.look, self.config = look, config
        self.engine = ScoringEngine.for_config(self.denoiser, conditions, config)
        self.timesteps = look.timesteps_on(self.engine.schedule.grid(look.grid, 0))

    def run(self, pixels: torch.Tensor, rows: np.ndarray, names: Sequence[str]) -> list[LookResult]:
        """Preprocessed images ([B, C, H, W] in [-1, 1], the model's own size) -> one LookResult each."""
        small = F.interpolate(pixels, size=self.denoiser.image_size, mode="bilinear", antialias=True,
                              align_corners=False)
        jobs = prepare_images(self.denoiser, self.config, small, rows, names=names)
        tables = self.engine.score(jobs, FixedTimesteps(self.timesteps), self.config.aggregate)
        by, results = f"first look at {self.look.resolution} px", []
        for table in tables:
            kept = self.look.shortlist(table, list(range(table.n_classes)), self.config.aggregate)
            results.append(LookResult(kept, table.nfe, {c: {**why, "by": by} for c, why in table.evidence.items()}))
        return results
