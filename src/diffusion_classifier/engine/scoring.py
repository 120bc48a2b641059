"""The scoring engine: runs strategies for many jobs at once, in shared network batches.

A job is one image (its clean sample x0 and a noise key) with its own candidate condition rows: rows of
the engine's embedded condition bank, [candidates, prompts], and optionally a null row (the empty prompt)
whose error is measured at every (t, eps) pair any candidate is, for unconditional normalisation.
Classification gives every image the same rows; caption ranking gives each image its texts.

For each job, every candidate is scored with the same (t, eps) pairs (a paired comparison). The noise
used at timestep t comes from a generator seeded by (noise key, t); the key is derived from the image's
content and the user's seed, so results do not depend on batch size, on which images share a batch, on
the number of processes or on image order; and two strategies that evaluate the same (candidate, t) of
an image get the same error there, so their results are paired too (and a stored exhaustive run can
replay any strategy on its grid exactly). Explicit noise follows the original code's layout instead:
entry i goes with the i-th distinct timestep evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..adapters.denoiser import Conditions, Denoiser
from ..errors import UserError, warn_once
from ..runtime import check_compiled
from . import robust
from .strategies import Round, ScoreTable, Strategy

if TYPE_CHECKING:
    from .config import ScoringConfig

NULL = -1  # the candidate index of a job's null row in a work item
DEFAULT_BATCH = 256  # network evaluations per pass on the CPU, and at most on CUDA (--batch-size auto)
AUTO_BATCH_SHARE = 0.8  # of the free GPU memory an automatic batch size plans to use
PINNED_BATCHES = 4  # batches of noise whose copies to the GPU may be in flight at once
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: 2.5+
WEIGHTINGS = ("uniform", "elbo")


def _hash_to_seed(*parts: bytes) -> int:
    digest = hashlib.sha256(b"\x00".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def image_seed(seed: int, pixels: torch.Tensor) -> int:
    """A noise key tied to the image's content (its preprocessed pixels) and the user's seed."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return _hash_to_seed(str(seed).encode(), data)


def noise_for(seed: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise an image (its key from image_seed) gets at timestep t."""
    generator = torch.Generator().manual_seed(_hash_to_seed(str(seed).encode(), str(t).encode()))
    return torch.randn(tuple(shape), generator=generator)


@dataclass
class Job:
    """One image to score against its own candidates."""

    x0: torch.Tensor  # [C, H, W] on the model's device
    noise_key: int
    rows: np.ndarray  # [candidates, prompts] rows of the engine's condition bank
    null_row: int | None = None
    t_min: int = 0
    explicit_noise: torch.Tensor | None = None
    name: str = ""  # the image's name in messages
    candidates: list[int] | None = None  # the rows the strategy starts from (default all; a first look's shortlist)


def check_robust_options(denoiser: Denoiser, config: ScoringConfig) -> None:
    """Refuse robust options where they do not apply (before any model work)."""
    if config.noise_aware and denoiser.vae is not None:
        raise UserError("noise-aware scoring is defined for pixel-space models; for latent models (Stable "
                        "Diffusion, DiT) the pixel noise level does not map to a latent one (see README)")
    if config.normalize_intensity and not denoiser.info.intensity_stats:
        raise UserError("this model has no stored intensity statistics, so it cannot normalise intensities")


class NonFiniteError(UserError):
    """NaN or inf where a number must be: a run stops rather than rank on it."""

    def __init__(self, denoiser: Denoiser, what: str, image: str = ""):
        dtype = str(denoiser.dtype).replace("torch.", "")
        hint = ("; float16 overflows easily: try --dtype bfloat16 or float32" if denoiser.dtype == torch.float16
                else f" (scoring in {dtype}; the model's weights or the image may hold NaN or inf)")
        super().__init__(f"NaN or inf in the {what} of image {image or '(unnamed)'}: nothing was ranked{hint}")


def _check_finite(denoiser: Denoiser, what: str, batch: torch.Tensor, names: Sequence[str]) -> None:
    finite = torch.isfinite(batch).flatten(1).all(1)
    if not finite.all():
        raise NonFiniteError(denoiser, what, names[int(finite.int().argmin())])


def prepare_images(denoiser: Denoiser, config: ScoringConfig, pixels: torch.Tensor, rows: np.ndarray,
                   null_row: int | None = None, noise: Sequence | None = None,
                   names: Sequence[str] | None = None) -> list[Job]:
    """Preprocessed images ([B, C, H, W] in [-1, 1]) -> one Job each, with the config's robust options
    applied; the noise key follows the pixels the model scores (after intensity normalisation). Latents that
    are not finite stop here (NonFiniteError), naming the image (`names`)."""
    if config.normalize_intensity:
        pixels = robust.normalize_intensity(pixels, denoiser.info.intensity_stats)
    t_mins = [0] * len(pixels)
    if config.noise_aware:  # after normalisation: the level the model sees
        sigma = robust.estimate_noise_sigma(pixels)
        t_mins = robust.min_timestep_for(sigma, denoiser.schedule, config.noise_margin).tolist()
    names = list(names) if names is not None else [f"#{i}" for i in range(len(pixels))]
    _check_finite(denoiser, "pixels", pixels, names)
    x0 = denoiser.encode_images(pixels)
    _check_finite(denoiser, "latents (the VAE's encoding)", x0, names)
    return [Job(x0[i], image_seed(config.seed, pixels[i]), rows, null_row, int(t_mins[i]),
                None if noise is None or noise[i] is None else torch.as_tensor(noise[i]).to(x0.device), names[i])
            for i in range(len(x0))]


@dataclass
class _Running:
    job: Job
    table: ScoreTable
    rounds: Iterator[Round]
    done: bool = False

    def new_noise(self, column: int, t: int) -> torch.Tensor:
        """The noise of this image's column (timestep t), made on the CPU (the engine moves it)."""
        explicit = self.job.explicit_noise
        if explicit is not None:
            if column >= len(explicit):
                raise UserError(f"explicit noise has {len(explicit)} entries but the strategy "
                                f"evaluates more distinct timesteps than that")
            return explicit[column].cpu()
        return noise_for(self.job.noise_key, t, self.job.x0.shape)


@dataclass
class EngineStats:
    network_seconds: float = 0.0  # wall time of the waves (network work and the one host sync per wave)
    network_calls: int = 0
    evaluations: int = 0
    padded: int = 0  # evaluations of padding rows (fixed batch shapes for a compiled network)
    compile_seconds: float = 0.0  # one-off: torch.compile, the compiling first call and its check against eager


class ScoringEngine:
    """Scores jobs against rows of an embedded condition bank (conditions: one row per condition), the engine's
    own or one given per `score` call (a matcher's texts differ from call to call).

    A wave (every running job's next round) is laid out as arrays of work items, evaluated in batches
    that are gathered on the device (no per-item stacking), with the errors kept on the device until the
    wave ends: the host waits for the device once per wave, so it queues the next batch while the
    current one runs. With `compile=True` the network is compiled and every batch is padded to
    `batch_size`, so one compiled graph serves the whole run.
    """

    def __init__(self, denoiser: Denoiser, conditions: Conditions | None, loss: str = "l2",
                 batch_size: int | str = "auto",
                 target: str = "eps", grid: str = "even", weighting: str = "uniform", compile: bool = False):
        self.auto_batch = batch_size == "auto"
        if not self.auto_batch and (not isinstance(batch_size, int) or batch_size < 1):
            raise UserError("--batch-size must be at least 1, or auto")
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown timestep weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.denoiser, self.conditions = denoiser, conditions
        self.loss, self.target = loss, target
        self.batch_size = batch_size if not self.auto_batch else None  # auto: sized at the first wave
        self._halved_from: int | None = None  # the automatic size before out-of-memory halved it
        self.schedule = denoiser.schedule.with_grid(grid)
        # ELBO weighting multiplies each error by -dlogSNR/dt at its position (mean 1 over the schedule)
        weights = denoiser.schedule.elbo_weights().float() if weighting == "elbo" else None
        self.weights = None if weights is None else weights.to(denoiser.device)
        self.compile = compile
        self._wrap_seconds = 0.0  # the torch.compile call, counted in stats.compile_seconds once compiling works
        self.stats = EngineStats()

    @classmethod
    def for_config(cls, denoiser: Denoiser, conditions: Conditions | None, config: ScoringConfig) -> ScoringEngine:
        return cls(denoiser, conditions, config.loss, config.batch_size, config.target, config.grid, config.weighting,
                   compile=config.compile)

    def score(self, jobs: Sequence[Job], strategy: Strategy, aggregate: str = "min",
              conditions: Conditions | None = None) -> list[ScoreTable]:
        """Run `strategy` for every job; one ScoreTable per job, in order. Jobs' rows index `conditions`
        (default: the engine's own bank)."""
        conditions = self.conditions if conditions is None else conditions
        if conditions is None:
            raise ValueError("no condition bank: give conditions to the engine or to score()")
        if self.compile and not self.denoiser.compiled:
            started = time.perf_counter()
            if self.denoiser.compile():  # its first use imports dynamo and inductor (about 1 s): compile time
                self._wrap_seconds = time.perf_counter() - started
            else:
                self.compile = False  # cannot compile here: eager, unpadded, and no retry
        running = []
        for job in jobs:
            n_candidates, n_prompts = np.shape(job.rows)
            table = ScoreTable(n_candidates, n_prompts, job.t_min, with_null=job.null_row is not None)
            running.append(_Running(job, table, strategy.rounds(table, self.schedule, aggregate, job.candidates)))
        while True:
            work = []
            for run in running:
                if run.done:
                    continue
                try:
                    work.append((run, next(run.rounds)))
                except StopIteration:
                    run.done = True
            if not work:
                return [run.table for run in running]
            self._evaluate(work, conditions)

    def _first_batch_size(self, conditions: Conditions) -> int:
        """--batch-size auto: 256 on the CPU; on CUDA what the free memory holds at the activation per sample of a
        probe batch of 2 (at most 256: larger batches hardly run faster). Out-of-memory halves it later."""
        device = self.denoiser.device
        if device.type != "cuda":
            return DEFAULT_BATCH
        channels, height, width = self.denoiser.latent_shape
        probe = 2
        x0 = torch.zeros(probe, channels, height, width, device=device, dtype=self.denoiser.dtype)
        cond = {key: value[:1].expand(probe, *value.shape[1:]) for key, value in conditions.items()}
        t = torch.full((probe,), self.denoiser.num_train_timesteps // 2, device=device)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with self.denoiser.eager() if self.denoiser.compiled else contextlib.nullcontext():  # no compile here
                self.denoiser.error(x0, torch.zeros_like(x0, dtype=torch.float32), t, cond, self.loss, self.target)
        except OUT_OF_MEMORY:
            torch.cuda.empty_cache()
            return 1  # and _smaller_batch says what to change if even that fails
        per_sample = max(1, (torch.cuda.max_memory_allocated(device) - before) / probe)
        free = torch.cuda.mem_get_info(device)[0]
        return int(min(DEFAULT_BATCH, max(1, free * AUTO_BATCH_SHARE // per_sample)))

    def _smaller_batch(self, device: torch.device) -> None:
        """After CUDA ran out of memory: halve an automatic batch size and retry (results do not depend on it), or
        say in one line what to change."""
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if self.auto_batch and self.batch_size > 1:
            self._halved_from = self._halved_from or self.batch_size  # reported once a batch fits
            self.batch_size = max(1, self.batch_size // 2)
            return
        weights = sum(t.numel() * t.element_size() for m in self.denoiser._modules() for t in m.parameters()
                      if t.device == device)
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
        hint = ("try --batch-size auto or a smaller one, " if not self.auto_batch else "")
        raise UserError(f"out of GPU memory at batch size {self.batch_size}: the model's weights on the GPU take "
                        f"{weights / 2**30:.1f} GiB of its {total / 2**30:.1f} GiB; {hint}--text-encoders cpu, a "
                        "lower --resolution, or see `diffusion-classifier estimate --model ...` for what fits")

    def _first_compiled_call(self, x0, noise, t, cond) -> torch.Tensor:
        """The call that compiles, checked against the eager network on the same batch (once per compiled
        network: engines that share it later do not repeat the check). Where compiling fails (no C compiler,
        an unsupported operation) or its errors differ from eager ones (a compiler bug), a one-line warning
        and the eager network from then on."""
        def eager():
            with self.denoiser.eager():
                return self.denoiser.error(x0, noise, t, cond, self.loss, self.target)

        tolerance = 1e-4 if self.denoiser.dtype == torch.float32 else 2e-2  # half precision: other roundings
        check = check_compiled(lambda: self.denoiser.error(x0, noise, t, cond, self.loss, self.target), eager,
                               type(self.denoiser.network).__name__, "errors", tolerance)
        if check.compiled is not None:  # it compiled (whether or not it then matched eager)
            self.stats.compile_seconds = self._wrap_seconds + check.seconds
        if check.failure:
            warn_once(f"--compile: {check.failure}; running eager")
            self.denoiser.uncompile()
            self.compile = False
            return check.eager
        self.denoiser.compile_checked = True
        return check.compiled

    @staticmethod
    def _work_items(work: list[tuple[_Running, Round]]) -> dict[str, np.ndarray]:
        """The wave's (job, condition row, timestep, column, candidate or NULL, prompt) items not yet
        evaluated, as parallel arrays, ordered job by job, then timestep, candidate, prompt (so the items that
        share a noise row are neighbours, and a batch makes each of its noise rows once)."""
        parts = []
        for j, (run, round_) in enumerate(work):
            table, rows = run.table, np.asarray(run.job.rows)
            timesteps = np.asarray(round_.timesteps, dtype=np.int64)
            columns = np.array([table.column(int(t)) for t in timesteps], dtype=np.int64)
            classes = np.asarray(round_.classes, dtype=np.int64)
            k, c, p = np.meshgrid(np.arange(len(timesteps)), classes, np.arange(rows.shape[1]), indexing="ij")
            c, p, k = c.ravel(), p.ravel(), k.ravel()
            todo = ~table.evaluated[c, p, columns[k]]
            c, p, k = c[todo], p[todo], k[todo]
            parts.append(dict(job=np.full(len(c), j), row=rows[c, p].astype(np.int64), t=timesteps[k],
                              col=columns[k], cand=c, prompt=p))
            if run.job.null_row is not None:
                todo = ~table.null_evaluated[columns]
                n = int(todo.sum())
                parts.append(dict(job=np.full(n, j), row=np.full(n, run.job.null_row, dtype=np.int64),
                                  t=timesteps[todo], col=columns[todo], cand=np.full(n, NULL), prompt=np.zeros(n,
                                                                                                           np.int64)))
        return {key: np.concatenate([part[key] for part in parts]).astype(np.int64) for key in parts[0]}

    def _evaluate(self, work: list[tuple[_Running, Round]], conditions: Conditions) -> None:
        """Evaluate every (job, candidate, prompt, timestep) item of this wave in shared batches."""
        items = self._work_items(work)
        n = len(items["t"])
        if n == 0:
            return
        device = self.denoiser.device
        if self.batch_size is None:
            self.batch_size = self._first_batch_size(conditions)
        started = time.perf_counter()
        # one noise row per distinct (job, column): each batch makes the rows it needs on the CPU (the noise
        # contract) and copies them through pinned memory while the device works on the batches before it;
        # no noise outlives its batch on the device
        pairs, first, noise_index = np.unique(np.stack([items["job"], items["col"]], axis=1), axis=0,
                                              return_index=True, return_inverse=True)
        noise_index, pair_t = noise_index.reshape(-1), items["t"][first]
        in_flight: list[tuple[torch.Tensor, torch.cuda.Event]] = []  # pinned buffers whose copies may still run
        x0_bank = torch.stack([run.job.x0 for run, _ in work]).to(device)
        as_device = {key: torch.from_numpy(value).to(device) for key, value in items.items()}
        errors = torch.empty(n, device=device)
        start = 0
        while start < n:
            stop = min(start + self.batch_size, n)
            needed, local = np.unique(noise_index[start:stop], return_inverse=True)
            host = torch.stack([work[pairs[k, 0]][0].new_noise(int(pairs[k, 1]), int(pair_t[k]))
                                for k in needed.tolist()])
            if device.type == "cuda":
                host = host.pin_memory()
            noise_rows = host.to(device, non_blocking=device.type == "cuda")
            if device.type == "cuda":  # a pinned buffer may go once its copy is done; keep a few batches' worth
                done = torch.cuda.Event()
                done.record()
                in_flight.append((host, done))
                while in_flight and (in_flight[0][1].query() or len(in_flight) > PINNED_BATCHES):
                    in_flight.pop(0)[1].synchronize()
            take = torch.arange(start, stop, device=device)
            local = torch.from_numpy(local.reshape(-1)).to(device)
            if self.compile and self.denoiser.compiled and len(take) < self.batch_size:  # one compiled shape
                take = torch.cat([take, take[-1:].expand(self.batch_size - len(take))])
                local = torch.cat([local, local[-1:].expand(self.batch_size - len(local))])
            x0 = x0_bank[as_device["job"][take]]
            eps = noise_rows[local]
            t = as_device["t"][take]
            cond = {key: value[as_device["row"][take]] for key, value in conditions.items()}
            try:
                if self.denoiser.compiled and not self.denoiser.compile_checked:
                    batch_errors = self._first_compiled_call(x0, eps, t, cond)
                else:
                    batch_errors = self.denoiser.error(x0, eps, t, cond, self.loss, self.target)
            except OUT_OF_MEMORY:
                del x0, eps, cond, noise_rows
                self._smaller_batch(device)
                continue  # the same items again, in a smaller batch
            if self._halved_from:  # the first batch that fits after halving: say so once
                warn_once(f"--batch-size auto: {self.batch_size} evaluations per pass fit this GPU (down from "
                          f"{self._halved_from} after running out of memory)")
                self._halved_from = None
            if self.weights is not None:
                batch_errors = batch_errors * self.weights[t]
            real = stop - start
            errors[start:stop] = batch_errors[:real]
            self.stats.network_calls += 1
            self.stats.evaluations += real
            self.stats.padded += len(take) - real
            start = stop
        host = errors.to("cpu", non_blocking=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        in_flight.clear()  # the copies are done
        self.stats.network_seconds += time.perf_counter() - started
        values = host.numpy().astype(np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            job = work[int(items["job"][np.argmin(finite)])][0].job
            raise NonFiniteError(self.denoiser, "denoising errors", job.name)
        bounds = np.searchsorted(items["job"], np.arange(len(work) + 1))  # items are grouped by job
        for j, (run, _) in enumerate(work):  # scatter into each job's table with fancy indexing
            mine = slice(bounds[j], bounds[j + 1])
            cand, prompt, col, value = items["cand"][mine], items["prompt"][mine], items["col"][mine], values[mine]
            null = cand == NULL
            run.table.record(cand[~null], prompt[~null], col[~null], value[~null])
            if null.any():
                run.table.record_null(col[null], value[null])
