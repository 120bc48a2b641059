"""Flux (schnell and dev layouts): FluxTransformer2DModel on 2x2-packed VAE latents, rectified flow.

As in diffusers' FluxPipeline: latents [B, C, H, W] are packed into [B, (H/2)(W/2), 4C] tokens with
img_ids (0, row, column) and text ids zeros; the network takes sigma itself as its timestep; text is the
T5 token states (max_text_length, default 512) plus CLIP's pooled output; guidance-distilled checkpoints
(dev, `guidance_embeds`) get a guidance value (model_index.json `guidance`, default 1.0: the conditional
prediction itself rather than an imitation of classifier-free guidance). The scheduler's shift depends on
the image's token count (diffusers' calculate_shift: mu linear in (H/2)(W/2) between base and max
sequence lengths); `sigma' = e^mu s / (1 + (e^mu - 1) s)` is a constant shift of e^mu (mu itself for
the "linear" time-shift type), so the schedule is a RectifiedFlowSchedule at the model's resolution
(model_index.json `resolution`, default 1024 pixels). VAE latents: (z - 0.1159) * 0.3611 from its config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .denoiser import Conditions, Denoiser, ModelInfo
from .schedules import RectifiedFlowSchedule

DEFAULT_RESOLUTION = 1024
T5_DEFAULT_LENGTH = 512


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] (diffusers' FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of (height, width)."""
    b, _, channels = tokens.shape
    return (tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
            .reshape(b, channels // 4, height, width))


def image_ids(height: int, width: int) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids (0, row, column) of the packed tokens."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3)


def shifted_schedule(scheduler, latent_height: int, latent_width: int) -> RectifiedFlowSchedule:
    config = scheduler.config
    shift = config.get("shift", 1.0)
    if config.get("use_dynamic_shifting"):
        seq_len = (latent_height // 2) * (latent_width // 2)
        base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
        shift = mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
    return RectifiedFlowSchedule(config.get("num_train_timesteps", 1000), shift, timestep_scale=1.0)


class FluxDenoiser(Denoiser):
    conditioning = "text"
    network_key = "transformer"
    pipeline_class_name = "FluxPipeline"

    def __init__(self, network, scheduler, vae, tokenizers: Sequence, text_encoders: Sequence, info=None):
        info = info if isinstance(info, ModelInfo) else ModelInfo.from_index(dict(info or {}))
        self.resolution_px = int(info.other.get("resolution", DEFAULT_RESOLUTION))
        side = self.resolution_px // 2 ** (len(vae.config.block_out_channels) - 1)
        super().__init__(network, scheduler, vae, info, schedule=shifted_schedule(scheduler, side, side))
        self.tokenizers = list(tokenizers)  # CLIP, T5
        self.text_encoders = [e.eval() for e in text_encoders]

    @classmethod
    def from_components(cls, load, specs, info, directory):
        tokenizers = [load("tokenizer"), load("tokenizer_2")]
        return cls(load("transformer"), load("scheduler"), load("vae"), tokenizers,
                   [load("text_encoder"), load("text_encoder_2")], info)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution_px // self.vae_scale_factor
        return (self.network.config.in_channels // 4, side, side)

    @property
    def takes_any_size(self) -> bool:
        return True

    @property
    def size_multiple(self) -> int:
        return 2 * self.vae_scale_factor  # latents are packed in 2 x 2 patches

    def _resolution_changed(self) -> None:
        """The shift follows the scored image's token count, as diffusers' pipeline computes it."""
        self.resolution_px = self.scoring_resolution
        side = self.resolution_px // self.vae_scale_factor
        self.schedule = shifted_schedule(self.scheduler, side, side)

    def text_modules(self):
        return list(self.text_encoders)

    def components(self):
        parts = super().components()
        parts.update(tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], text_encoder=self.text_encoders[0],
                     text_encoder_2=self.text_encoders[1])
        return parts

    @property
    def t5_length(self) -> int:
        return int(self.info.max_text_length or T5_DEFAULT_LENGTH)

    @property
    def guidance(self) -> float:
        return float(self.info.other.get("guidance", 1.0))

    def null_condition(self) -> str:
        return ""

    def text_limits(self):
        clip_tok, t5_tok = self.tokenizers
        return [(clip_tok, clip_tok.model_max_length), (t5_tok, self.t5_length)]

    @torch.inference_mode()
    def _embed_conditions(self, prompts: Sequence[str], batch_size: int = 32) -> Conditions:
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.text_encoders
        states, pooled = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            ids = clip_tok(chunk, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids
            pooled.append(clip(ids.to(clip.device), output_hidden_states=False).pooler_output.to(self.dtype))
            ids = t5_tok(chunk, padding="max_length", max_length=self.t5_length, truncation=True,
                         return_tensors="pt").input_ids
            states.append(t5(ids.to(t5.device), output_hidden_states=False)[0].to(self.dtype))
        return {"encoder_hidden_states": torch.cat(states), "pooled_projections": torch.cat(pooled)}

    def _network(self, x_t, t, cond):
        b, _, height, width = x_t.shape
        text_length = cond["encoder_hidden_states"].shape[1]
        extra = {}
        if self.network.config.guidance_embeds:
            extra["guidance"] = torch.full((b,), self.guidance, device=x_t.device, dtype=x_t.dtype)
        out = self.network(hidden_states=pack(x_t), timestep=self.schedule.model_timestep(t).to(x_t.dtype),
                           pooled_projections=cond["pooled_projections"],
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           txt_ids=torch.zeros(text_length, 3, device=x_t.device, dtype=x_t.dtype),
                           img_ids=image_ids(height, width).to(x_t.device, x_t.dtype), **extra).sample
        return unpack(out, height, width)
