"""The Denoiser interface: one small adapter over every model family.

A `Denoiser` knows how to
  * map images in [-1, 1] into the space the model diffuses in (pixels, or the
    VAE posterior mean, shifted and scaled by the VAE's factors),
  * embed conditions once per candidate set (prompts through the model's own
    tokenizer and text encoder, or class ids),
  * give the per-sample noise-prediction error `error(x0, noise, t, cond)`,
    which is the quantity a diffusion classifier compares.

Its `schedule` (schedules.py) maps grid positions t to the network's timestep input and the noise
scales, and turns the network's prediction (epsilon, v, x0 or a flow velocity) into an epsilon
estimate, so the error is always taken on the noise. Everything above this module is model-agnostic;
each family is one file in adapters/ plus a registry entry in loading.py.

Prediction types are compared on one footing: for v-prediction eps - eps_hat = sqrt(abar) (v - v_hat),
the paper's unweighted epsilon objective, so presets, timestep ablations and noise-aware restrictions
mean the same thing on every model. (Scoring v itself would reweight timesteps by 1 / abar.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError, warn_once
from .schedules import NoiseSchedule, schedule_from_scheduler

LOSSES = ("l2", "l1", "huber")
TARGETS = ("eps", "velocity")

Conditions = dict[str, torch.Tensor]  # every tensor has one row per condition


def per_sample_error(target: torch.Tensor, prediction: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Mean over channels and pixels of the elementwise loss: one number per sample."""
    target, prediction = target.float(), prediction.float()
    if loss == "l2":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    elif loss == "l1":
        elementwise = F.l1_loss(prediction, target, reduction="none")
    elif loss == "huber":
        elementwise = F.huber_loss(prediction, target, reduction="none")
    else:
        raise UserError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return elementwise.flatten(1).mean(dim=1)


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run on this device here, or None."""
    import importlib.util
    import os
    import shutil

    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "compiling for CUDA needs triton, which is not installed"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")
                                        if c):
        return "compiling for the CPU needs a C++ compiler (none found)"
    if device.type not in ("cpu", "cuda"):
        return f"compiling for {device.type} is not supported here"
    return None


def vae_dtype(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """float32 for a VAE whose config asks for it (force_upcast, AutoencoderKL's default) when scoring in float16,
    where such VAEs overflow (SDXL's gives NaN at 1024 pixels); the scoring dtype otherwise."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", True) else dtype


def cast_module(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a module's floating-point parameters and buffers to `dtype`, except the submodules its library keeps in
    float32 (transformers' and diffusers' _keep_in_fp32_modules under float16, _keep_in_fp32_modules_strict
    under either half dtype: T5's feed-forward output layers overflow in float16). Already-right tensors are not
    touched, so a module loaded that way by its library is left exactly as loaded."""
    kept = set(getattr(module, "_keep_in_fp32_modules", None) or []) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        kept |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    for name, sub in module.named_modules():
        target = torch.float32 if kept and kept.intersection(name.split(".")) else dtype
        for param in sub.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != target:
                param.data = param.data.to(target)
        for key, buffer in sub._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != target:
                sub._buffers[key] = buffer.to(target)


@dataclass
class ModelInfo:
    """What a pipeline directory's model_index.json says about the model beyond its components."""

    class_names: list[str] | None = None
    id2label: dict[str, str] | None = None  # as the hub's DiT repos carry
    text_encoder_source: str | None = None  # a package, directory or hub id our models reference
    max_text_length: int | None = None
    text_attention_mask: bool = False  # Stable Diffusion feeds CLIP unmasked; our BERT-based models mask
    text_pooling: str | None = None  # "mean": cross-attend to the sentence embedding only
    calibration: dict | None = None  # {"temperature": T, ...} from tools/store_calibration.py
    intensity_stats: dict | None = None  # training images' intensity range (robust.py)
    layout: str | None = None  # "pairs": trained on two items side by side (pairs.py)
    other: dict = field(default_factory=dict)  # keys we do not interpret, kept on save

    @classmethod
    def from_index(cls, index: dict) -> ModelInfo:
        known = {f.name for f in fields(cls)} - {"other"}
        return cls(**{k: v for k, v in index.items() if k in known},
                   other={k: v for k, v in index.items() if k not in known})

    def to_index(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "other"}
        out = {k: v for k, v in out.items() if v not in (None, False)}
        return {**out, **self.other}

    def names(self) -> list[str] | None:
        """Class names: saved ones, else the id2label map in id order."""
        if self.class_names is None and self.id2label:
            return [self.id2label[str(i)] for i in range(len(self.id2label))]
        return self.class_names

    @property
    def temperature(self) -> float | None:
        return None if not self.calibration else self.calibration.get("temperature")


class Denoiser:
    """Base adapter. Subclasses implement `_network` and `embed_conditions`, and `from_components`
    for loading (loading.py)."""

    conditioning: str  # "text" or "class"
    network_key = "unet"
    pipeline_class_name = "DiffusionPipeline"

    def __init__(self, network: torch.nn.Module, scheduler: Any, vae: torch.nn.Module | None = None,
                 info: ModelInfo | dict | None = None, schedule: NoiseSchedule | None = None):
        self.network = network.eval()
        self.scheduler = scheduler
        self.schedule = schedule or schedule_from_scheduler(scheduler)
        self.source_dir: Path | None = None  # the directory load_denoiser read it from
        self.weight_files: list[Path] | None = None  # the weight files it loaded (None: every one under source_dir)
        self.fine_tunes: list[dict] = []  # LoRAs fused into it and single files it came from (finetunes.py)
        self.weights_variant: str | None = None  # "fp16" where variant weight files were loaded (hub.py)
        self.vae = vae.eval() if vae is not None else None
        self.info = info if isinstance(info, ModelInfo) else ModelInfo.from_index(dict(info or {}))

    @classmethod
    def from_components(cls, load, specs: dict, info: ModelInfo, directory: Path) -> Denoiser:
        """Build the adapter from a pipeline directory; `load(name)` loads one named component."""
        raise NotImplementedError

    # ----- facts about the model -------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.schedule.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the sample the network denoises."""
        if self.scoring_resolution:
            side = self.scoring_resolution // self.vae_scale_factor
            return (self.network.config.in_channels, side, side)
        size = self.network.config.sample_size
        height, width = (size, size) if isinstance(size, int) else (size[0], size[1])
        return (self.network.config.in_channels, height, width)

    # ----- scoring resolution (latent models whose networks take any size) ---------
    scoring_resolution: int | None = None  # pixels per side, when set_resolution chose one

    @property
    def takes_any_size(self) -> bool:
        """Whether the network accepts other sample sizes than its native one (families override)."""
        return False

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor times the network's downsampling."""
        config = self.network.config
        if "block_out_channels" in config:
            down = 2 ** (len(config.block_out_channels) - 1)
        else:
            down = int(config.get("patch_size") or 1)
        return self.vae_scale_factor * down

    def set_resolution(self, pixels: int) -> Denoiser:
        """Score at `pixels` x `pixels` instead of the native size (cost grows with the square of the side).
        Only latent families whose networks take any size; a one-line error for the others."""
        if not self.takes_any_size:
            height, width = self.image_size
            raise UserError(f"--resolution: {type(self.network).__name__} of this model takes one size "
                            f"({height} x {width} pixels), so it cannot score at another")
        multiple = self.size_multiple
        if pixels < multiple or pixels % multiple:
            raise UserError(f"--resolution must be a positive multiple of {multiple} for this model, got {pixels}")
        self.scoring_resolution = int(pixels)
        self._resolution_changed()
        return self

    def at_resolution(self, pixels: int) -> Denoiser:
        """A twin of this denoiser that scores at `pixels` x `pixels`; it shares the networks, and this one is
        left as it was (runs take a caller's model and must not change it)."""
        import copy

        return copy.copy(self).set_resolution(pixels)

    def _resolution_changed(self) -> None:
        """Families whose schedule depends on the image size re-derive it here (Flux)."""

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the image the model expects."""
        _, height, width = self.latent_shape
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    @property
    def resolution(self) -> int:
        """Side of the square image the model expects (the height for non-square models)."""
        return self.image_size[0]

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.latent_shape[0]

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes a class-conditional model was trained on (from its saved config)."""
        return self.info.names()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Denoiser:
        """Move every module to `device` and cast it to the scoring `dtype`, keeping in float32 what the
        libraries keep so (cast_module) and a VAE that asks for float32 under float16 (vae_dtype)."""
        text = {id(m) for m in self.text_modules()}
        for module in self._modules():
            if device is not None:  # torch's own .to: diffusers' override warns about float32-kept modules
                parked = id(module) in text and self.text_placement != "gpu" and torch.device(device).type == "cuda"
                torch.nn.Module.to(module, device="cpu" if parked else device)
            if dtype is not None:
                cast_module(module, vae_dtype(module.config, dtype) if module is self.vae else dtype)
        return self

    # ----- compilation -----------------------------------------------------------
    compiled = False
    compile_checked = False  # the compiled network's first call matched eager (ScoringEngine checks it once)

    def compile(self) -> bool:
        """torch.compile the network in place for fixed shapes (the engine pads batches to one size).
        Results are unchanged up to float rounding. Where compiling cannot work here, a one-line warning
        and False; a failure at the first call falls back the same way (ScoringEngine)."""
        reason = compile_unavailable(self.device)
        if reason:
            warn_once(f"--compile: {reason}; running eager")
            return False
        self.network.compile(dynamic=False)
        self.compiled, self.compile_checked = True, False
        return True

    def uncompile(self) -> None:
        self.network._compiled_call_impl = None  # what nn.Module.compile set
        self.compiled = self.compile_checked = False

    @contextlib.contextmanager
    def eager(self):
        """The network runs uncompiled inside this block (to check a compiled call against it)."""
        saved, self.network._compiled_call_impl = self.network._compiled_call_impl, None
        try:
            yield
        finally:
            self.network._compiled_call_impl = saved

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.network, self.vae) if m is not None] + self.text_modules()

    def text_modules(self) -> list[torch.nn.Module]:
        """The text encoders (families with text conditioning override this)."""
        return []

    # ----- the interface the engine uses ------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape [B, C, H, W] -> the clean sample x0 the model diffuses."""
        if self.vae is None:
            return pixels.to(self.device, self.dtype)
        vae_dtype = next(self.vae.parameters()).dtype  # float32 where its config asks for it (vae_dtype)
        shift = self.vae.config.get("shift_factor") or 0.0
        chunk = self.vae_chunk(*pixels.shape[-2:])
        return torch.cat([((self.vae.encode(part.to(self.device, vae_dtype)).latent_dist.mean - shift)
                           * self.vae.config.scaling_factor).to(self.dtype) for part in pixels.split(chunk)])

    VAE_CHUNK_BYTES = 2 * 2**30  # activation memory one VAE call may take

    def vae_chunk(self, height: int, width: int) -> int:
        """Images per VAE call: its encoder's first blocks keep about five tensors of its first width alive at
        full resolution (about 1.3 GiB per image at 1024 px in half precision)."""
        if self.vae is None:
            return 1 << 30
        element = next(self.vae.parameters()).element_size()
        per_image = 5 * self.vae.config.block_out_channels[0] * height * width * element
        return max(1, int(self.VAE_CHUNK_BYTES // per_image))

    # where the text encoders live on a GPU: "gpu" (with the network), "cpu", or "auto": the CPU between embeddings,
    # on the network's device while they embed where they fit there (load_denoiser's text_encoders)
    text_placement: str = "gpu"

    def embed_conditions(self, conditions: Sequence, **options) -> Conditions:
        """Embed candidates once (prompts through the model's text encoders, or class ids): one row each, on the
        network's device, in the scoring dtype."""
        with self._encoders_where_they_embed():
            embedded = self._embed_conditions(conditions, **options)
        return {key: value.to(self.device) for key, value in embedded.items()}

    def _embed_conditions(self, conditions: Sequence, **options) -> Conditions:
        raise NotImplementedError

    @contextlib.contextmanager
    def _encoders_where_they_embed(self):
        """With text_encoders "auto", encoders parked on the CPU move to the network's GPU for one embedding
        when the free memory holds them with room to spare, and go back after it."""
        modules, device = self.text_modules(), self.device
        parked = [m for m in modules if next(m.parameters()).device != device]
        if self.text_placement != "auto" or device.type != "cuda" or not parked:
            yield
            return
        size = sum(t.numel() * t.element_size() for m in parked for t in (*m.parameters(), *m.buffers()))
        if torch.cuda.mem_get_info(device)[0] < 1.25 * size:
            yield  # they embed on the CPU
            return
        for module in parked:
            torch.nn.Module.to(module, device=device)
        try:
            yield
        finally:
            for module in parked:
                torch.nn.Module.to(module, device="cpu")
            torch.cuda.empty_cache()

    def text_limits(self) -> list[tuple[Any, int]]:
        """(tokenizer, tokens kept) per text encoder a text model feeds; a longer text is cut there."""
        return []

    def check_texts(self, texts: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
        """(warnings naming each text longer than a text encoder keeps, pairs of different texts that are identical
        within every encoder's limit): such a pair's errors tie exactly, so comparing them decides nothing."""
        limits = self.text_limits()
        seen: dict[tuple, str] = {}
        too_long, same = [], []
        for text in dict.fromkeys(texts) if limits else ():
            kept = []
            for tokenizer, limit in limits:
                full = len(tokenizer(text, truncation=False)["input_ids"])
                if full > limit:
                    too_long.append(f"text longer than the model's {limit} tokens ({full}); only its start is "
                                    f"scored: {text!r}")
                kept.append(tuple(tokenizer(text, truncation=True, max_length=limit)["input_ids"]))
            key = tuple(kept)
            if key in seen:
                same.append((seen[key], text))
            seen.setdefault(key, text)
        return too_long, same

    def null_condition(self) -> Any:
        """The condition of the unconditional model (the empty prompt), for normalised scores."""
        raise UserError(f"{type(self).__name__} has no unconditional (null) condition")

    def _network(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The raw network output for noised samples x_t at grid positions t."""
        raise NotImplementedError

    @torch.inference_mode()
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The model's epsilon estimate, whatever it was trained to predict."""
        out = self._network(x_t.to(self.dtype), t, cond).float()
        return self.schedule.to_epsilon(out, x_t, t)

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.noised(x0, noise, t)

    @torch.inference_mode()
    def error(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditions,
              loss: str = "l2", target: str = "eps") -> torch.Tensor:
        """Per-sample error between the true noise and the model's estimate of it (target "eps", the paper's),
        or between the family's velocity and its estimate (target "velocity": for flow models the
        velocity error is the eps error times 1 / (1 - sigma)^2, for VP models times 1 / abar)."""
        x_t = self.noised(x0, noise, t)
        eps_hat = self.predict_noise(x_t, t, cond)
        if target == "eps":
            return per_sample_error(noise, eps_hat, loss)
        if target != "velocity":
            raise UserError(f"unknown error target {target!r}; choose one of {', '.join(TARGETS)}")
        s = self.schedule
        return per_sample_error(s.velocity(x0, noise, t), s.velocity_from_epsilon(eps_hat, x_t, t), loss)

    # ----- persistence ---------------------------------------------------------
    def diffusers_pipeline(self) -> Any:
        """The diffusers pipeline of this model's family built around this adapter's own modules (shared, not
        copied): what diffusers' LoRA loading works on. A one-line error for families diffusers has no
        pipeline for (our own models)."""
        import diffusers

        cls = getattr(diffusers, self.pipeline_class_name, None)
        if cls is None:
            raise UserError(f"{self.pipeline_class_name} is not a diffusers pipeline, so diffusers cannot load "
                            "LoRA weights into it")
        parts = self.components()
        required, optional = cls._get_signature_keys(cls)
        extra = {"requires_safety_checker": False} if "requires_safety_checker" in optional else {}
        return cls(**{name: parts.get(name) for name in required}, **extra)

    def components(self) -> dict[str, Any]:
        parts = {self.network_key: self.network, "scheduler": self.scheduler}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a diffusers-style pipeline directory that `load_denoiser` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": self.pipeline_class_name}
        for name, part in self.components().items():
            library = type(part).__module__.split(".")[0]
            index[name] = [library, type(part).__name__]
            part.save_pretrained(directory / name)
        index.update(self.info.to_index())
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
