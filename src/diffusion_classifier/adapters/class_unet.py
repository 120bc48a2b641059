"""Class-conditional families share the conditions (class ids); UNet2DModel with a class embedding is our
pixel-space class-conditional model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from .denoiser import Conditions, Denoiser


class ClassConditionalDenoiser(Denoiser):
    conditioning = "class"

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def _embed_conditions(self, class_ids: Sequence[int]) -> Conditions:
        ids = [int(i) for i in class_ids]
        if any(not 0 <= i < self.num_classes for i in ids):
            raise UserError(f"class ids must lie in [0, {self.num_classes}); got {ids}")
        return {"class_labels": torch.tensor(ids, dtype=torch.long, device=self.device)}


class ClassUNetDenoiser(ClassConditionalDenoiser):
    pipeline_class_name = "PixelClassDiffusionPipeline"

    @classmethod
    def from_components(cls, load, specs, info, directory):
        unet = load("unet")
        if getattr(unet.config, "num_class_embeds", None) is None:
            raise UserError(f"{directory}: the UNet has no class embedding, so it is not conditional")
        return cls(unet, load("scheduler"), load.optional("vae"), info)

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_class_embeds)

    def _network(self, x_t, t, cond):
        return self.network(x_t, self.schedule.model_timestep(t), class_labels=cond["class_labels"]).sample
