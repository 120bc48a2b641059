"""Stable Diffusion XL: UNet2DConditionModel with addition_embed_type "text_time", VP schedule (epsilon or
v-prediction, converted to epsilon by the schedule).

Text as in diffusers' StableDiffusionXLPipeline: the penultimate hidden states of both CLIP text encoders
concatenated on channels; pooled text_embeds from the encoder with a projection (the second). The
micro-conditioning add_time_ids = original size + crop top-left + target size is the scored image's own
(height, width), (0, 0), (height, width): the image is scored as an uncropped image of its own size. The
empty prompt (the unconditional reference) is encoded like any prompt; diffusers' force_zeros_for_empty_prompt
only concerns classifier-free guidance's negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .denoiser import Conditions, Denoiser
from .text_unet import clip_states


class SDXLDenoiser(Denoiser):
    conditioning = "text"
    pipeline_class_name = "StableDiffusionXLPipeline"

    def __init__(self, network, scheduler, vae, tokenizers: Sequence, text_encoders: Sequence, info=None,
                 schedule=None):
        super().__init__(network, scheduler, vae, info, schedule)
        self.tokenizers = list(tokenizers)
        self.text_encoders = [e.eval() for e in text_encoders]

    @property
    def takes_any_size(self) -> bool:
        return True

    @classmethod
    def from_components(cls, load, specs, info, directory):
        pairs = [(load(t), load(e)) for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                 if load.optional(e) is not None]
        return cls(load("unet"), load("scheduler"), load("vae"), [t for t, _ in pairs], [e for _, e in pairs], info)

    def text_modules(self):
        return list(self.text_encoders)

    def components(self):
        parts = super().components()
        suffixes = ("", "_2") if len(self.text_encoders) == 2 else ("_2",)  # a refiner has only the second
        for suffix, tokenizer, encoder in zip(suffixes, self.tokenizers, self.text_encoders):
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, encoder
        return parts

    def null_condition(self) -> str:
        return ""

    def text_limits(self):
        return [(tokenizer, tokenizer.model_max_length) for tokenizer in self.tokenizers]

    def time_ids(self, n: int) -> torch.Tensor:
        """[n, 6]: (original height, width), crop (top, left) = (0, 0), (target height, width)."""
        height, width = self.image_size
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device).repeat(n, 1)

    @torch.inference_mode()
    def _embed_conditions(self, prompts: Sequence[str], batch_size: int = 32) -> Conditions:
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            hidden, text_embeds = [], None
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
                penultimate, first = clip_states(tokenizer, encoder, chunk)
                if text_embeds is None and first.ndim == 2:  # pooled text_embeds of the projection encoder
                    text_embeds = first
                hidden.append(penultimate)
            states.append(torch.cat(hidden, dim=-1).to(self.dtype))
            pooled.append(text_embeds.to(self.dtype))
        return {"encoder_hidden_states": torch.cat(states), "text_embeds": torch.cat(pooled)}

    def _network(self, x_t, t, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": self.time_ids(len(x_t))}
        return self.network(x_t, self.schedule.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"],
                            added_cond_kwargs=added).sample
