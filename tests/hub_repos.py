"""Tiny pipelines laid out like the real hub repositories, for tests/fake_hub.py.

Each repository is a tiny random-weight pipeline (conftest's builders) rearranged into the file layout of
the real one: fp16 variants beside the full weights, legacy .bin copies, ONNX / Flax / OpenVINO exports,
single-file checkpoints at the root, extra folders model_index.json does not name, slow-tokenizer files
(vocab.json + merges.txt), sharded weights with their index. Files a loader must never fetch hold a few
junk bytes, so fetching one by mistake is caught by the download log, not by a crash.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .conftest import CLASSES, build_dit, build_flux, build_sd3, build_sdxl, build_stable_diffusion

JUNK = b"not to be fetched"
SD2 = "stabilityai/stable-diffusion-2-base"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SD35 = "stabilityai/stable-diffusion-3.5-medium"
FLUX = "black-forest-labs/FLUX.1-schnell"
DIT = "facebook/DiT-XL-2-256"
GATED_TOKEN = "hf_test_token_for_the_gated_repository"


def _junk(repo: Path, *paths: str) -> None:
    for path in paths:
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(JUNK)


def _fp16_variant(repo: Path, folder: str) -> None:
    """name.fp16.safetensors beside every name.safetensors of a folder (shards and index included)."""
    for path in sorted((repo / folder).glob("*.safetensors")):
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}
        stem, _, shard = path.stem.partition("-")
        save_file(tensors, path.with_name(f"{stem}.fp16{'-' + shard if shard else ''}.safetensors"))
    for index in sorted((repo / folder).glob("*.safetensors.index.json")):
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v.replace(".safetensors", "").replace("-", ".fp16-", 1) + ".safetensors"
                              if "-" in v else v.replace(".safetensors", ".fp16.safetensors")
                              for k, v in data["weight_map"].items()}
        index.with_name(index.name.replace(".index.json", ".index.fp16.json")).write_text(json.dumps(data))


def _slow_clip_tokenizer(repo: Path, folder: str, source: Path) -> None:
    """The CLIP tokenizer folders of the real repositories: vocab.json, merges.txt and two small configs."""
    target = repo / folder
    config = json.loads((target / "tokenizer_config.json").read_text())
    shutil.rmtree(target)
    target.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, target / name)
    (target / "tokenizer_config.json").write_text(json.dumps(
        {k: config[k] for k in ("model_max_length", "bos_token", "eos_token", "unk_token", "pad_token",
                                "do_lower_case", "errors") if k in config} | {"tokenizer_class": "CLIPTokenizer"}))
    (target / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))


def _reshard(repo: Path, folder: str, library: str, shards: int) -> None:
    """Save a component again in about `shards` shards with their index (as the large real components are)."""
    import importlib

    config = json.loads((repo / folder / "config.json").read_text())
    class_name = config.get("_class_name") or config["architectures"][0]
    cls = getattr(importlib.import_module(library), class_name)
    model = cls.from_pretrained(repo / folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for path in (repo / folder).glob("*.safetensors"):
        path.unlink()
    model.save_pretrained(repo / folder, max_shard_size=max(1, size // shards // 1000 + 1) * 1000)
    assert len(list((repo / folder).glob("*-of-*.safetensors"))) >= 2, f"{folder} was not sharded"


def _finish(repo: Path, index_updates: dict | None = None) -> Path:
    for helper in repo.glob("_*"):  # the builders' tokenizer sources
        shutil.rmtree(helper)
    if index_updates:
        index = json.loads((repo / "model_index.json").read_text())
        index.update(index_updates)
        (repo / "model_index.json").write_text(json.dumps(index, indent=2))
    (repo / "README.md").write_text("# a tiny stand-in\n")
    (repo / ".repo").write_text("")
    return repo


def sd2_base(root: Path) -> Path:
    repo = build_stable_diffusion(root / SD2)
    for folder in ("text_encoder", "unet", "vae"):
        _fp16_variant(repo, folder)
    _slow_clip_tokenizer(repo, "tokenizer", repo / "_tok")
    _junk(repo, "512-base-ema.ckpt", "512-base-ema.safetensors", "text_encoder/pytorch_model.bin",
          "text_encoder/pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.bin",
          "unet/diffusion_pytorch_model.fp16.bin", "vae/diffusion_pytorch_model.bin",
          "vae/diffusion_pytorch_model.fp16.bin")
    (repo / "feature_extractor").mkdir()
    (repo / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224}))
    return _finish(repo, {"feature_extractor": ["transformers", "CLIPImageProcessor"],
                          "requires_safety_checker": False})


def sdxl_base(root: Path) -> Path:
    repo = build_sdxl(root / SDXL)
    for folder in ("text_encoder", "text_encoder_2", "unet", "vae"):
        _fp16_variant(repo, folder)
    _slow_clip_tokenizer(repo, "tokenizer", repo / "_tok1")
    _slow_clip_tokenizer(repo, "tokenizer_2", repo / "_tok2")
    shutil.copytree(repo / "vae", repo / "vae_1_0")
    _junk(repo, "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
          "sd_xl_offset_example-lora_1.0.safetensors", "text_encoder/model.onnx", "text_encoder/flax_model.msgpack",
          "text_encoder/openvino_model.bin", "text_encoder/openvino_model.xml", "text_encoder_2/model.onnx",
          "text_encoder_2/model.onnx_data", "unet/model.onnx", "unet/model.onnx_data", "unet/openvino_model.bin",
          "unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack", "vae_decoder/model.onnx",
          "vae_encoder/model.onnx")
    (repo / "vae_decoder" / "config.json").write_text("{}")
    (repo / "vae_encoder" / "config.json").write_text("{}")
    return _finish(repo)


def sd35_medium(root: Path) -> Path:
    repo = build_sd3(root / SD35)
    _reshard(repo, "text_encoder_3", "transformers", 2)
    _junk(repo, "sd3.5_medium.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/clip_l.safetensors",
          "text_encoders/t5xxl_fp16.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
          "SD3.5M_example_workflow.json")
    (repo / "tokenizer_3" / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    _slow_clip_tokenizer(repo, "tokenizer", repo / "_tok1")
    _slow_clip_tokenizer(repo, "tokenizer_2", repo / "_tok2")
    return _finish(repo)


def flux_schnell(root: Path) -> Path:
    repo = build_flux(root / FLUX)
    _reshard(repo, "transformer", "diffusers", 3)
    _reshard(repo, "text_encoder_2", "transformers", 2)
    _slow_clip_tokenizer(repo, "tokenizer", repo / "_tok1")
    _junk(repo, "flux1-schnell.safetensors", "ae.safetensors", "schnell_grid.jpeg")
    return _finish(repo)


def dit(root: Path) -> Path:
    repo = build_dit(root / DIT, CLASSES)
    _junk(repo, "transformer/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin")
    return _finish(repo)


def fp16_only(root: Path, repo_id: str = "someone/sd-fp16-only") -> Path:
    """A repository published with fp16 files alone (no full-precision weights)."""
    repo = build_stable_diffusion(root / repo_id)
    for folder in ("text_encoder", "unet", "vae"):
        _fp16_variant(repo, folder)
        for path in (repo / folder).glob("*.safetensors"):
            if ".fp16" not in path.name:
                path.unlink()
    return _finish(repo)


def lora_repo(root: Path, lora_file: Path, repo_id: str = "someone/tiny-sd-lora") -> Path:
    repo = root / repo_id
    repo.mkdir(parents=True)
    shutil.copy(lora_file, repo / "pytorch_lora_weights.safetensors")
    return _finish(repo)


def build_hub(root: Path) -> dict[str, Path]:
    """Every repository, under root; SD3.5 medium gated (readable with GATED_TOKEN)."""
    torch.manual_seed(0)
    repos = {name: make(root) for name, make in (("sd2", sd2_base), ("sdxl", sdxl_base), ("sd35", sd35_medium),
                                                  ("flux", flux_schnell), ("dit", dit), ("fp16_only", fp16_only))}
    (root / "gated.json").write_text(json.dumps({SD35: GATED_TOKEN}))
    return repos
