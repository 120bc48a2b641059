"""Fine-tunes as users share them: LoRA weights fused into a base model, and single-file checkpoints.

LoRAs go through diffusers' own LoRA loading (peft, with its conversions of kohya / other trainers' key
formats): the adapter's modules are wrapped in their diffusers pipeline (Denoiser.diffusers_pipeline, no
copy), each LoRA is loaded, fused at its scale and unloaded, so scoring runs on plain weights at the base
model's speed. Single-file checkpoints go through diffusers' from_single_file with the base pipeline's configs
(--config): a file holding the denoising network alone (most UNet / transformer fine-tunes) replaces the
base's network, and the base's other components are used as they are (its network's weights are never
fetched); a file holding a whole pipeline (the original Stable Diffusion layout) gives every component it holds.
What was fused or loaded is recorded in `Denoiser.fine_tunes` (part of a run's identity).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from . import hub

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
LORA_DEFAULT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' trainers write
NETWORK_KEYS = ("unet", "transformer")
PIPELINE_FILE_PREFIXES = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----- LoRA ----------------------------------------------------------------------------------------------
def lora_file(source: str | Path) -> Path:
    """A LoRA given as a file, a directory or a hub id ("org/name", or "org/name/file.safetensors") -> its file."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        return _one_lora_file(str(source), [c.name for c in candidates], lambda name: path / name)
    name = str(source)
    if name.count("/") == 2 and name.endswith(".safetensors"):  # org/name/file
        repo_id, filename = name.rsplit("/", 1)
        return _hub_file(repo_id, filename)
    if hub.is_hub_id(name):
        from huggingface_hub import HfApi

        with hub.hub_errors(name, "LoRA"):
            files = [f for f in HfApi().list_repo_files(name) if f.endswith(".safetensors")]
        return _one_lora_file(name, files, lambda filename: _hub_file(name, filename))
    raise UserError(f"--lora {name}: no such file or directory, and not a hub id like 'org/name'")


def _one_lora_file(source: str, names: Sequence[str], fetch) -> Path:
    if LORA_DEFAULT_FILE in names:
        return fetch(LORA_DEFAULT_FILE)
    if len(names) == 1:
        return fetch(names[0])
    if not names:
        raise UserError(f"--lora {source}: holds no .safetensors file")
    raise UserError(f"--lora {source}: holds several .safetensors files ({', '.join(names[:4])}); name one, e.g. "
                    f"--lora {source}/{names[0]}")


def _hub_file(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    with hub.hub_errors(repo_id, "LoRA"):
        return Path(hf_hub_download(repo_id, filename))


def fuse_loras(denoiser, sources: Sequence[str | Path], scales: Sequence[float] = ()) -> None:
    """Fuse each LoRA into the denoiser's network (and text encoders, where it holds weights for them) at its
    scale (default 1.0 each), through diffusers' LoRA loading."""
    scales = [float(s) for s in scales] if scales else [1.0] * len(sources)  # counts checked by load_denoiser
    files = [lora_file(source) for source in sources]  # every LoRA found before any is fused
    pipe = denoiser.diffusers_pipeline()
    if not hasattr(pipe, "load_lora_weights"):
        raise UserError(f"diffusers has no LoRA loading for {type(pipe).__name__}")
    for k, (source, path, scale) in enumerate(zip(sources, files, scales)):
        name = f"lora{k}"
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise UserError(f"--lora {source}: diffusers could not load it into {type(pipe).__name__} "
                            f"({str(exc).strip().splitlines()[0][:200]}); is it a LoRA for this model family?") from exc
        pipe.fuse_lora(lora_scale=scale, adapter_names=[name])
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
        denoiser.fine_tunes.append({"lora": str(source), "scale": scale, "sha256": file_sha256(path)})


# ----- single-file checkpoints ------------------------------------------------------------------------------
def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise UserError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from exc
    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except Exception as exc:  # a pickle that needs code, or not a checkpoint at all
        raise UserError(f"{path} could not be read as a checkpoint ({str(exc).splitlines()[0][:200]})") from exc
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state)


def load_single_file(model: str | Path, base_config: str | Path | None, dtype: torch.dtype, variant: str | None):
    """A Denoiser from a single-file checkpoint and its base pipeline (`base_config`, the CLI's --config: a
    directory or hub id)."""
    from . import loading

    path = Path(model).expanduser()
    if not path.is_file():
        raise UserError(f"single-file checkpoint {path} not found")
    if not str(path).endswith(SINGLE_FILE_SUFFIXES):
        raise UserError(f"--config is for single-file checkpoints ({', '.join(SINGLE_FILE_SUFFIXES)}); "
                        f"{path} is not one")
    if base_config is None:
        raise UserError(f"{path} is a single-file checkpoint: give its base pipeline with --config (a diffusers "
                        "directory or hub id, e.g. stabilityai/stable-diffusion-xl-base-1.0), whose configs and "
                        "other components it is loaded with")
    keys = _checkpoint_keys(path)
    whole_pipeline = any(key.startswith(PIPELINE_FILE_PREFIXES) for key in keys)
    # the base's network weights are never needed; its other components fill in what the file lacks
    base_dir = loading.resolve_model_dir(base_config, variant, skip_weights=NETWORK_KEYS)
    index = loading.read_index(base_dir)
    network_key = next((k for k in NETWORK_KEYS if k in index), None)
    if network_key is None:
        raise UserError(f"--config {base_config}: its model_index.json names no unet or transformer")
    record = {"single_file": str(path), "config": str(base_config), "sha256": file_sha256(path)}
    if whole_pipeline:
        denoiser = _whole_pipeline(path, base_dir, index, dtype)
    else:
        network = _network_from_file(path, base_dir, network_key, index[network_key], dtype)
        denoiser = loading.load_pipeline(base_dir, dtype, variant, given={network_key: network})
        denoiser.weight_files = [path, *denoiser.weight_files]
    denoiser.fine_tunes.append(record)
    return denoiser


def _network_from_file(path: Path, base_dir: Path, key: str, spec: list, dtype: torch.dtype) -> Any:
    import diffusers

    cls = getattr(diffusers, spec[1], None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise UserError(f"diffusers cannot load a single-file {spec[1]} (no from_single_file for it)")
    try:
        return cls.from_single_file(str(path), config=str(base_dir), subfolder=key, torch_dtype=dtype)
    except Exception as exc:  # diffusers raises its own SingleFileComponentError besides the usual ones
        raise UserError(f"{path} is not a {spec[1]} checkpoint for the base pipeline given by --config "
                        f"({str(exc).strip().splitlines()[0][:200]})") from exc


def _whole_pipeline(path: Path, base_dir: Path, index: dict, dtype: torch.dtype):
    """A checkpoint holding every component (the original SD / SDXL / SD3 layouts), through the base
    pipeline's diffusers class."""
    import diffusers

    from . import loading

    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise UserError(f"diffusers cannot load a single-file {index.get('_class_name')} checkpoint")
    try:
        pipe = cls.from_single_file(str(path), config=str(base_dir), torch_dtype=dtype)
    except Exception as exc:  # diffusers raises its own SingleFileComponentError besides the usual ones
        raise UserError(f"diffusers could not load {path} as a {cls.__name__} checkpoint with the configs of "
                        f"{base_dir} ({str(exc).strip().splitlines()[0][:200]}); if it lacks components (text "
                        "encoders), pass a directory holding the full base pipeline as --config") from exc
    return loading.load_pipeline(base_dir, dtype, None, given={name: getattr(pipe, name) for name in
                                                              loading.component_names(index)
                                                              if getattr(pipe, name, None) is not None})
