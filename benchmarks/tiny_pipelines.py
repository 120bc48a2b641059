"""Tiny random-weight pipelines of every supported family, laid out as the real hub repositories are and saved
with save_pretrained (the test suite's models, and the smoke mode of benchmarks such as compile_check.py),
and random images to score with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLASSES = ["cat", "dog", "bird", "fish"]


def _byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-to-unicode table: every byte maps to one printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_clip(directory: Path):
    """A CLIP tokenizer over a byte-level vocabulary with no merges, and a 2-layer text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _byte_chars()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, bos_token_id=len(vocab) - 2,
                            eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    return tokenizer, CLIPTextModel(config).eval()


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         latent_channels=4, norm_num_groups=8, sample_size=16)


def build_stable_diffusion(directory: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer, text_encoder = tiny_clip(directory / "_tok")
    torch.manual_seed(2)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, skip_prk_steps=True)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def build_dit(directory: Path, class_names: list[str]) -> Path:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(3)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, norm_num_groups=8,
                                        num_embeds_ada_norm=len(class_names))
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.save_pretrained(directory)
    index = json.loads((directory / "model_index.json").read_text())
    index["id2label"] = {str(i): name for i, name in enumerate(class_names)}  # as the hub's DiT repos carry
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


def build_pixel_class(directory: Path, class_names: list[str], channels: int = 1, size: int = 8) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    from diffusion_classifier.adapters.class_unet import ClassUNetDenoiser

    torch.manual_seed(4)
    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=[8, 16],
                       layers_per_block=1, norm_num_groups=4, down_block_types=["DownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "UpBlock2D"], num_class_embeds=len(class_names))
    ClassUNetDenoiser(unet, DDPMScheduler(), info={"class_names": class_names}).save_pretrained(directory)
    return directory


def build_pixel_text(directory: Path) -> Path:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from diffusion_classifier.adapters.text_unet import TextUNetDenoiser

    tokenizer, text_encoder = tiny_clip(directory / "_tok")
    torch.manual_seed(5)
    unet = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16],
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=32, attention_head_dim=4,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
    TextUNetDenoiser(unet, DDPMScheduler(), tokenizer, text_encoder,
                     info={"text_attention_mask": True, "max_text_length": 12}).save_pretrained(directory)
    return directory


def tiny_t5(directory: Path, d_model: int = 64):
    """A Unigram (sentencepiece-style) T5 tokenizer over single characters, and a 1-layer T5 encoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,-'"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0)
    torch.manual_seed(6)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                      decoder_start_token_id=0)
    return tokenizer, T5EncoderModel(config).eval()


def tiny_clip_with_projection(directory: Path, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, encoder = tiny_clip(directory)
    torch.manual_seed(seed)
    config = CLIPTextConfig(**{**encoder.config.to_dict(), "projection_dim": 32})
    return tokenizer, CLIPTextModelWithProjection(config).eval()


def build_sd3(directory: Path, with_t5: bool = True) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok1, enc1 = tiny_clip_with_projection(directory / "_tok1", 7)
    tok2, enc2 = tiny_clip_with_projection(directory / "_tok2", 8)
    tok3, enc3 = tiny_t5(directory / "_tok3") if with_t5 else (None, None)
    torch.manual_seed(9)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=enc1, tokenizer=tok1, text_encoder_2=enc2, tokenizer_2=tok2,
                                    text_encoder_3=enc3, tokenizer_3=tok3)
    pipe.save_pretrained(directory)
    index = json.loads((directory / "model_index.json").read_text())
    index["max_text_length"] = 12  # T5 tokens per prompt (diffusers' default is 256)
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


def build_sdxl(directory: Path, prediction_type: str = "epsilon") -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok1, enc1 = tiny_clip(directory / "_tok1")
    tok2, enc2 = tiny_clip_with_projection(directory / "_tok2", 10)
    torch.manual_seed(11)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=64, attention_head_dim=4,
                                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                                transformer_layers_per_block=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(directory)
    return directory


def build_flux(directory: Path, guidance: bool = False) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tok1, enc1 = tiny_clip(directory / "_tok1")
    tok2, enc2 = tiny_t5(directory / "_tok2", d_model=32)
    torch.manual_seed(12)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=[4, 6, 6])
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    vae = tiny_vae()
    vae.register_to_config(shift_factor=0.1159, scaling_factor=0.3611)
    assert isinstance(enc1, CLIPTextModel)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=enc1, tokenizer=tok1,
                        text_encoder_2=enc2, tokenizer_2=tok2)
    pipe.save_pretrained(directory)
    index = json.loads((directory / "model_index.json").read_text())
    index.update(resolution=16, max_text_length=12)  # pixels of the scored image; T5 tokens per prompt
    (directory / "model_index.json").write_text(json.dumps(index))
    return directory


def random_images(n: int, size: int = 20, mode: str = "RGB", seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1}[mode]
    return [Image.fromarray(rng.integers(0, 256, (size, size, channels), dtype=np.uint8).squeeze(), mode)
            for _ in range(n)]


def image_folder(root: Path, names: list[str], per_class: int, size: int = 8, mode: str = "L") -> Path:
    """An ImageFolder of random images, class c's seeded by c."""
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(random_images(per_class, size=size, mode=mode, seed=c)):
            img.save(root / name / f"{i}.png")
    return root
