"""Stable Diffusion 3 / 3.5: SD3Transformer2DModel on VAE latents, rectified flow (velocity prediction).

Text as in diffusers' StableDiffusion3Pipeline: the penultimate hidden states of CLIP-L and CLIP-G
(77 tokens each) concatenated on channels and zero-padded to the transformer's joint_attention_dim,
then the T5 token states (max_text_length, default 256) appended along the sequence; T5 may be absent,
and its tokens are then zeros (as diffusers allows). Pooled projections: both CLIPs' text_embeds
concatenated. The network's timestep input is sigma * 1000 (the schedule's model_timestep); latents are
(z - shift_factor) * scaling_factor (Denoiser.encode_images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .denoiser import Conditions, Denoiser
from .text_unet import clip_states

T5_DEFAULT_LENGTH = 256


class SD3Denoiser(Denoiser):
    conditioning = "text"
    network_key = "transformer"
    pipeline_class_name = "StableDiffusion3Pipeline"

    def __init__(self, network, scheduler, vae, tokenizers: Sequence, text_encoders: Sequence, info=None,
                 schedule=None):
        super().__init__(network, scheduler, vae, info, schedule)
        self.tokenizers = list(tokenizers)  # CLIP-L, CLIP-G, T5 (or None)
        self.text_encoders = [None if e is None else e.eval() for e in text_encoders]

    @property
    def takes_any_size(self) -> bool:
        return True

    @classmethod
    def from_components(cls, load, specs, info, directory):
        tokenizers = [load("tokenizer"), load("tokenizer_2"), load.optional("tokenizer_3")]
        encoders = [load("text_encoder"), load("text_encoder_2"), load.optional("text_encoder_3")]
        return cls(load("transformer"), load("scheduler"), load("vae"), tokenizers, encoders, info)

    def text_modules(self):
        return [e for e in self.text_encoders if e is not None]

    def components(self):
        parts = super().components()
        for k, suffix in enumerate(("", "_2", "_3")):
            if self.text_encoders[k] is not None:
                parts[f"tokenizer{suffix}"] = self.tokenizers[k]
                parts[f"text_encoder{suffix}"] = self.text_encoders[k]
        return parts

    @property
    def t5_length(self) -> int:
        return int(self.info.max_text_length or T5_DEFAULT_LENGTH)

    def null_condition(self) -> str:
        return ""

    def text_limits(self):
        clip = [(tokenizer, tokenizer.model_max_length) for tokenizer in self.tokenizers[:2]]
        return clip + ([(self.tokenizers[2], self.t5_length)] if self.text_encoders[2] is not None else [])

    @torch.inference_mode()
    def _embed_conditions(self, prompts: Sequence[str], batch_size: int = 32) -> Conditions:
        width = self.network.config.joint_attention_dim
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            clip_hidden, clip_pooled = [], []
            for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
                hidden, pooled_out = clip_states(tokenizer, encoder, chunk)
                clip_hidden.append(hidden)
                clip_pooled.append(pooled_out)
            clip = torch.cat(clip_hidden, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
            if self.text_encoders[2] is not None:
                ids = self.tokenizers[2](chunk, padding="max_length", max_length=self.t5_length, truncation=True,
                                         add_special_tokens=True, return_tensors="pt").input_ids
                t5 = self.text_encoders[2](ids.to(self.text_encoders[2].device))[0]
            else:
                t5 = torch.zeros(len(chunk), self.t5_length, width, device=clip.device, dtype=clip.dtype)
            states.append(torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(self.dtype))
            pooled.append(torch.cat(clip_pooled, dim=-1).to(self.dtype))
        return {"encoder_hidden_states": torch.cat(states), "pooled_projections": torch.cat(pooled)}

    def _network(self, x_t, t, cond):
        return self.network(hidden_states=x_t, timestep=self.schedule.model_timestep(t).to(x_t.dtype),
                            encoder_hidden_states=cond["encoder_hidden_states"],
                            pooled_projections=cond["pooled_projections"]).sample
