"""DiT (DiTTransformer2DModel + AutoencoderKL), class-conditional on ImageNet ids."""

from __future__ import annotations

from .class_unet import ClassConditionalDenoiser


class DiTDenoiser(ClassConditionalDenoiser):
    network_key = "transformer"
    pipeline_class_name = "DiTPipeline"

    @classmethod
    def from_components(cls, load, specs, info, directory):
        return cls(load("transformer"), load("scheduler"), load.optional("vae"), info)

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_embeds_ada_norm)

    def _network(self, x_t, t, cond):
        out = self.network(x_t, timestep=self.schedule.model_timestep(t), class_labels=cond["class_labels"]).sample
        # With learned sigma the output stacks [eps, variance]; the eps half is what we score.
        return out[:, : x_t.shape[1]]
