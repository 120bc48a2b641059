"""Which GPU runs which family: `estimate` on every family at its published size, and a check of the
estimate's method against the peaks measured on an H200.

    python -m benchmarks.estimate_families          # about 2 minutes on the CPU; nothing is downloaded

Part 1 (check): each network alone (gpu_throughput's published configs), one forward traced under fake tensors
with estimate.LiveBytes, against benchmarks/results/gpu_throughput.json's measured peaks (same batch sizes).
Part 2 (table): for each family a configs-only pipeline directory is written from the published configs
(model_index.json and every component's config; the tokenizers are small stand-ins with the real lengths, which
is all an estimate reads of them), and `estimate` gives the weights on the GPU, the peak at batch 256 and the
largest batch for 24, 48 and 80 GB, with the text encoders off the GPU after embedding (the default) and on it.
Prints both tables and writes benchmarks/results/estimate_families.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from diffusion_classifier.adapters.estimate import GIB, LiveBytes, estimate
from diffusion_classifier.runtime import atomic_write_text

from .common import RESULTS
from .gpu_throughput import DIT_XL_2_256, SD2_UNET, SD3_MEDIUM, SDXL_UNET

MEMORIES = (24, 48, 80)

# ----- published configs (the hub repositories' config.json files, trimmed to what the classes need) ---------
def vae(latent_channels: int = 4, sample_size: int = 512, **extra) -> dict:
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": latent_channels,
            "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": sample_size,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, **extra}


def clip(hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "gelu") -> dict:
    config = {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
              "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": hidden,
              "intermediate_size": 4 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 77,
              "hidden_act": act, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
    return {**config, "projection_dim": projection} if projection else config


T5_XXL = {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": 32128, "d_model": 4096,
          "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64, "feed_forward_proj": "gated-gelu",
          "is_encoder_decoder": False, "decoder_start_token_id": 0}
CLIP_L, CLIP_L_PROJ = clip(768, 12, 12, act="quick_gelu"), clip(768, 12, 12, 768, act="quick_gelu")
CLIP_G, OPENCLIP_H = clip(1280, 32, 20, 1280), clip(1024, 23, 16)
SD35_MEDIUM = dict(SD3_MEDIUM, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=list(range(13)))
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
            axes_dims_rope=[16, 56, 56])
SD_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": True,
                  "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}

def sd35(transformer: dict) -> tuple[str, dict]:
    return ("StableDiffusion3Pipeline", {
        "transformer": ("diffusers", "SD3Transformer2DModel", transformer),
        "vae": ("diffusers", "AutoencoderKL", vae(16, 1024, scaling_factor=1.5305, shift_factor=0.0609)),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L_PROJ), "tokenizer": "clip",
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G), "tokenizer_2": "clip",
        "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL), "tokenizer_3": "t5",
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", FLOW_SCHEDULER)})


FAMILIES = {  # name: (pipeline class, {component: (library, class, config)})
    "SD 2 base (512 px)": ("StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", SD2_UNET), "vae": ("diffusers", "AutoencoderKL", vae()),
        "text_encoder": ("transformers", "CLIPTextModel", OPENCLIP_H), "tokenizer": "clip",
        "scheduler": ("diffusers", "EulerDiscreteScheduler", SD_SCHEDULER)}),
    "SDXL base (1024 px)": ("StableDiffusionXLPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", SDXL_UNET),
        "vae": ("diffusers", "AutoencoderKL", vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True)),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L), "tokenizer": "clip",
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G), "tokenizer_2": "clip",
        "scheduler": ("diffusers", "EulerDiscreteScheduler", SD_SCHEDULER)}),
    "SD3.5 medium (1024 px)": sd35(SD35_MEDIUM),
    "SD3.5 large (1024 px)": sd35(SD35_LARGE),
    "Flux schnell / dev (1024 px)": ("FluxPipeline", {
        "transformer": ("diffusers", "FluxTransformer2DModel", FLUX),
        "vae": ("diffusers", "AutoencoderKL", vae(16, 1024, scaling_factor=0.3611, shift_factor=0.1159)),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L), "tokenizer": "clip",
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL), "tokenizer_2": "t5",
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER)}),
    "DiT-XL/2 (256 px)": ("DiTPipeline", {
        "transformer": ("diffusers", "DiTTransformer2DModel", DIT_XL_2_256),
        "vae": ("diffusers", "AutoencoderKL", vae(sample_size=256)),
        "scheduler": ("diffusers", "DDIMScheduler", {"_class_name": "DDIMScheduler"})}),
}


def stand_in_tokenizer(kind: str, folder: Path) -> list:
    """A small tokenizer with the real one's length (CLIP 77 tokens; T5 as the adapters cut it): an estimate
    reads only the token count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5TokenizerFast

    folder.mkdir(parents=True)
    letters = list("abcdefghijklmnopqrstuvwxyz .,")
    if kind == "t5":
        tok = Tokenizer(models.Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters],
                                       unk_id=2))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                        extra_ids=0).save_pretrained(folder)
        return ["transformers", "T5TokenizerFast"]
    vocab = {c: i for i, c in enumerate(letters + ["<|startoftext|>", "<|endoftext|>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                            model_max_length=77).save_pretrained(folder)
    return ["transformers", "PreTrainedTokenizerFast"]


def write_pipeline(root: Path, pipeline: str, components: dict) -> Path:
    index = {"_class_name": pipeline}
    for name, spec in components.items():
        if isinstance(spec, str):
            index[name] = stand_in_tokenizer(spec, root / name)
            continue
        library, class_name, config = spec
        (root / name).mkdir(parents=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (root / name / file).write_text(json.dumps({"_class_name": class_name, **config}))
        index[name] = [library, class_name]
    if pipeline == "DiTPipeline":
        index["id2label"] = {str(i): f"class {i}" for i in range(1000)}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def network_check() -> list[dict]:
    """Each network alone, as gpu_throughput measured it, traced under fake tensors."""
    import diffusers
    from torch._subclasses.fake_tensor import FakeTensorMode

    measured = {}
    gpu = RESULTS / "gpu_throughput.json"
    if gpu.exists():
        for row in json.loads(gpu.read_text())["rows"]:
            if row.get("what", "").startswith("forward eager") and row.get("peak_gib"):
                measured[(row["model"], row["batch"])] = row["peak_gib"]
    bf16 = torch.bfloat16
    cases = [("sd2-unet", "UNet2DConditionModel", SD2_UNET, 256, lambda b: dict(
                 sample=torch.randn(b, 4, 64, 64, dtype=bf16), timestep=torch.ones(b),
                 encoder_hidden_states=torch.randn(b, 77, 1024, dtype=bf16))),
             ("sd2-unet", "UNet2DConditionModel", SD2_UNET, 512, lambda b: dict(
                 sample=torch.randn(b, 4, 64, 64, dtype=bf16), timestep=torch.ones(b),
                 encoder_hidden_states=torch.randn(b, 77, 1024, dtype=bf16))),
             ("sdxl-unet", "UNet2DConditionModel", SDXL_UNET, 64, lambda b: dict(
                 sample=torch.randn(b, 4, 128, 128, dtype=bf16), timestep=torch.ones(b),
                 encoder_hidden_states=torch.randn(b, 77, 2048, dtype=bf16),
                 added_cond_kwargs=dict(text_embeds=torch.randn(b, 1280, dtype=bf16),
                                        time_ids=torch.randn(b, 6, dtype=bf16)))),
             ("sd3-medium-transformer", "SD3Transformer2DModel", SD3_MEDIUM, 32, lambda b: dict(
                 hidden_states=torch.randn(b, 16, 128, 128, dtype=bf16), timestep=torch.ones(b, dtype=bf16),
                 encoder_hidden_states=torch.randn(b, 333, 4096, dtype=bf16),
                 pooled_projections=torch.randn(b, 2048, dtype=bf16))),
             ("dit-xl-2-256", "DiTTransformer2DModel", DIT_XL_2_256, 256, lambda b: dict(
                 hidden_states=torch.randn(b, 4, 32, 32, dtype=bf16), timestep=torch.ones(b, dtype=torch.long),
                 class_labels=torch.zeros(b, dtype=torch.long)))]
    rows = []
    for model, cls, config, batch, inputs in cases:
        with FakeTensorMode() as mode:
            torch.set_default_dtype(bf16)
            try:
                network = getattr(diffusers, cls)(**config).eval()
            finally:
                torch.set_default_dtype(torch.float32)
            weights = sum(p.numel() * p.element_size() for p in network.parameters())
            tracker = LiveBytes()
            with torch.inference_mode(), tracker:
                network(**inputs(batch))
        del mode
        estimated = (weights + tracker.peak) / GIB
        real = measured.get((model, batch))
        rows.append({"network": model, "batch": batch, "estimated_gib": estimated, "measured_gib": real,
                     "relative_error": None if real is None else estimated / real - 1})
    return rows


def main() -> None:
    started = time.perf_counter()
    check = network_check()
    print("| network | batch | estimated GiB | measured GiB (H200) | relative |\n|---|---|---|---|---|")
    for r in check:
        measured = f"{r['measured_gib']:.1f}" if r["measured_gib"] else "-"
        relative = f"{100 * r['relative_error']:+.0f}%" if r["relative_error"] is not None else "-"
        print(f"| {r['network']} | {r['batch']} | {r['estimated_gib']:.1f} | {measured} | {relative} |")
    families = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (pipeline, components)) in enumerate(FAMILIES.items()):
            folder = write_pipeline(Path(tmp) / f"p{k}", pipeline, components)
            row = {"family": name}
            for placement in ("auto", "gpu"):
                result = estimate(folder, text_encoders=placement)
                fits = {m: result.max_batch(m * GIB) for m in MEMORIES}
                row[placement] = {"weights_on_gpu_gib": sum(c["gib"] for c in result.components
                                                            if c["where"] == "gpu"),
                                  "peak_gib_batch_256": result.peak_gib,
                                  "activation_mib_per_sample": result.activation_gib_per_sample * 1024,
                                  "max_batch": fits, "components": result.components}
            families.append(row)
    print("\n| family | weights on the GPU | peak at batch 256 | largest batch: 24 / 48 / 80 GB | text encoders "
          "kept on the GPU: weights, 24 / 48 / 80 GB |\n|---|---|---|---|---|")
    for row in families:
        auto, gpu = row["auto"], row["gpu"]
        print(f"| {row['family']} | {auto['weights_on_gpu_gib']:.1f} GiB | {auto['peak_gib_batch_256']:.0f} GiB | "
              + " / ".join(str(auto["max_batch"][m] or "no") for m in MEMORIES)
              + f" | {gpu['weights_on_gpu_gib']:.1f} GiB, "
              + " / ".join(str(gpu["max_batch"][m] or "no") for m in MEMORIES) + " |")
    out = RESULTS / "estimate_families.json"
    atomic_write_text(json.dumps({"check": check, "families": families, "torch": torch.__version__,
                                  "seconds": time.perf_counter() - started}, indent=2) + "\n", out)
    print(f"wrote {out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
