"""UNet2DConditionModel with a text encoder: Stable Diffusion 1.x/2.x (with a VAE), or our pixel-space
text-conditioned models (no VAE; the text encoder may be referenced by package instead of shipped)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from .denoiser import Conditions, Denoiser


def clip_states(tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [B, L, D], first output) of a CLIP text encoder, at the tokenizer's full
    length: what SD3's and SDXL's pipelines condition on (the first output is CLIPTextModelWithProjection's
    pooled text_embeds, or CLIPTextModel's last hidden state)."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def sentence_embedding(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token states -> [B, 1, D]: masked mean, L2-normalised (sentence-transformers' pooling for
    all-MiniLM-L6-v2), times sqrt(D) so its entries have about unit scale like token states."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return torch.nn.functional.normalize(pooled, dim=-1).unsqueeze(1) * states.shape[-1] ** 0.5


class TextUNetDenoiser(Denoiser):
    conditioning = "text"
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, network, scheduler, tokenizer=None, text_encoder=None, vae=None, info=None, schedule=None):
        """tokenizer and text_encoder may be None when the conditions come already embedded (training
        exports, which name their encoder in `text_encoder_source`; benchmarks on random networks)."""
        super().__init__(network, scheduler, vae, info, schedule)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        if vae is None:
            self.pipeline_class_name = "PixelTextDiffusionPipeline"

    @classmethod
    def from_components(cls, load, specs, info, directory):
        if info.text_encoder_source:
            tokenizer, text_encoder = load.text_encoder(info.text_encoder_source)
        else:
            for part in ("tokenizer", "text_encoder"):
                if part not in specs:
                    raise UserError(f"{directory / 'model_index.json'} names no {part!r} for its text-conditioned UNet")
            tokenizer, text_encoder = load("tokenizer"), load("text_encoder")
        vae = load.optional("vae")
        return cls(load("unet"), load("scheduler"), tokenizer, text_encoder, vae, info)

    def text_modules(self):
        return [self.text_encoder] if self.text_encoder is not None else []

    @property
    def takes_any_size(self) -> bool:
        return self.vae is not None  # Stable Diffusion 1.x / 2.x; our pixel models are trained at one size

    def components(self):
        parts = super().components()
        if not self.info.text_encoder_source:
            parts.update(tokenizer=self.tokenizer, text_encoder=self.text_encoder)
        return parts

    @property
    def max_text_length(self) -> int:
        return int(self.info.max_text_length or self.tokenizer.model_max_length)

    def null_condition(self) -> str:
        return ""

    def text_limits(self):
        return [(self.tokenizer, self.max_text_length)] if self.tokenizer is not None else []

    @torch.inference_mode()
    def _embed_conditions(self, prompts: Sequence[str], batch_size: int = 64) -> Conditions:
        if self.text_encoder is None:
            raise UserError("this text model was built without its text encoder, so it cannot embed prompts")
        masked = self.info.text_attention_mask
        hidden, masks = [], []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                                    max_length=self.max_text_length, truncation=True, return_tensors="pt")
            ids = tokens.input_ids.to(self.text_encoder.device)
            mask = tokens.attention_mask.to(self.text_encoder.device)
            states = self.text_encoder(ids, attention_mask=mask if masked else None)[0]
            if self.info.text_pooling == "mean":
                states, mask = sentence_embedding(states, mask), mask[:, :1]
            hidden.append(states.to(self.dtype))
            masks.append(mask)
        cond = {"encoder_hidden_states": torch.cat(hidden)}
        if masked:
            cond["encoder_attention_mask"] = torch.cat(masks)
        return cond

    def _network(self, x_t, t, cond):
        return self.network(x_t, self.schedule.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"],
                            encoder_attention_mask=cond.get("encoder_attention_mask")).sample
