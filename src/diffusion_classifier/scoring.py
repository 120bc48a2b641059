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

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import robust
from .denoisers import Conditions, Denoiser
from .errors import UserError, warn_once
from .strategies import Round, ScoreTable, Strategy

if TYPE_CHECKING:
    from .config import ScoringConfig

NULL = -1  # the candidate index of a job's null row in a work item
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


def check_robust_options(denoiser: Denoiser, config: ScoringConfig) -> None:
    """Refuse robust options where they do not apply (before any model work)."""
    if config.noise_aware and denoiser.vae is not None:
        raise UserError("noise-aware scoring is defined for pixel-space models; for latent models (Stable "
                        "Diffusion, DiT) the pixel noise level does not map to a latent one (see README)")
    if config.normalize_intensity and not denoiser.info.intensity_stats:
        raise UserError("this model has no stored intensity statistics, so it cannot normalise intensities")


def prepare_images(denoiser: Denoiser, config: ScoringConfig, pixels: torch.Tensor, rows: np.ndarray,
                   null_row: int | None = None, noise: Sequence | None = None) -> list[Job]:
    """Preprocessed images ([B, C, H, W] in [-1, 1]) -> one Job each, with the config's robust options
    applied; the noise key follows the pixels the model scores (after intensity normalisation)."""
    if config.normalize_intensity:
        pixels = robust.normalize_intensity(pixels, denoiser.info.intensity_stats)
    t_mins = [0] * len(pixels)
    if config.noise_aware:  # after normalisation: the level the model sees
        sigma = robust.estimate_noise_sigma(pixels)
        t_mins = robust.min_timestep_for(sigma, denoiser.schedule, config.noise_margin).tolist()
    x0 = denoiser.encode_images(pixels)
    return [Job(x0[i], image_seed(config.seed, pixels[i]), rows, null_row, int(t_mins[i]),
                None if noise is None or noise[i] is None else torch.as_tensor(noise[i]).to(x0.device))
            for i in range(len(x0))]


@dataclass
class _Running:
    job: Job
    table: ScoreTable
    rounds: Iterator[Round]
    noise_cache: dict = field(default_factory=dict)  # column -> noise on the model's device
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


class _NoiseBank:
    """A wave's noise on the device, one row per distinct (job, column) pair, filled as batches need it:
    from a job's cache when an earlier wave used that noise, else made on the CPU and copied through
    pinned memory (without waiting for the copy)."""

    def __init__(self, work: list[tuple[_Running, Round]], pairs: np.ndarray, pair_t: np.ndarray,
                 device: torch.device):
        self.work, self.device = work, device
        self.jobs, self.columns, self.timesteps = pairs[:, 0].tolist(), pairs[:, 1].tolist(), pair_t.tolist()
        self.bank = torch.empty((len(pairs), *work[0][0].job.x0.shape), device=device)
        self.ready = np.zeros(len(pairs), dtype=bool)
        self.in_flight: list[torch.Tensor] = []  # pinned host buffers whose copies may still run

    def fill(self, rows: np.ndarray) -> None:
        rows = np.unique(rows)
        rows = rows[~self.ready[rows]]
        if not len(rows):
            return
        self.ready[rows] = True
        cached, fresh = [], []
        for k in rows.tolist():
            (cached if self.columns[k] in self.work[self.jobs[k]][0].noise_cache else fresh).append(k)
        if cached:
            self.bank[torch.tensor(cached, device=self.device)] = torch.stack(
                [self.work[self.jobs[k]][0].noise_cache[self.columns[k]] for k in cached])
        if fresh:
            host = torch.stack([self.work[self.jobs[k]][0].new_noise(self.columns[k], self.timesteps[k])
                                for k in fresh])
            if self.device.type == "cuda":
                host = host.pin_memory()
                self.in_flight.append(host)
            index = torch.tensor(fresh, device=self.device)
            self.bank[index] = host.to(self.device, non_blocking=True)
            for k in fresh:  # later waves of the same image reuse it (staged and elimination rounds)
                self.work[self.jobs[k]][0].noise_cache[self.columns[k]] = self.bank[k]

    def release(self) -> None:
        """After the wave's sync: the copies are done, the pinned buffers can go."""
        self.in_flight.clear()


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

    def __init__(self, denoiser: Denoiser, conditions: Conditions | None, loss: str = "l2", batch_size: int = 256,
                 target: str = "eps", grid: str = "even", weighting: str = "uniform", compile: bool = False):
        if batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if weighting not in WEIGHTINGS:
            raise UserError(f"unknown timestep weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        self.denoiser, self.conditions = denoiser, conditions
        self.loss, self.batch_size, self.target = loss, batch_size, target
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
            running.append(_Running(job, table, strategy.rounds(table, self.schedule, aggregate)))
        while True:
            work = []
            for run in running:
                if run.done:
                    continue
                try:
                    work.append((run, next(run.rounds)))
                except StopIteration:
                    run.done = True
                    run.noise_cache.clear()  # finished images release their noise (large for latent models)
            if not work:
                return [run.table for run in running]
            self._evaluate(work, conditions)

    def _first_compiled_call(self, x0, noise, t, cond) -> torch.Tensor:
        """The call that compiles, checked against the eager network on the same batch (once per compiled
        network: engines that share it later do not repeat the check). Where compiling fails (no C compiler,
        an unsupported operation) or its errors differ from eager ones (a compiler bug), a one-line warning
        and the eager network from then on."""
        name = type(self.denoiser.network).__name__
        started = time.perf_counter()
        try:
            errors = self.denoiser.error(x0, noise, t, cond, self.loss, self.target)
            if errors.device.type == "cuda":
                torch.cuda.synchronize(errors.device)
        except Exception as exc:  # torch._dynamo / inductor raise many kinds
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            warn_once(f"--compile: compiling {name} failed ({reason}); running eager")
            self.denoiser.uncompile()
            self.compile = False
            return self.denoiser.error(x0, noise, t, cond, self.loss, self.target)
        with self.denoiser.eager():
            eager = self.denoiser.error(x0, noise, t, cond, self.loss, self.target)
        difference = float((errors - eager).norm() / eager.norm().clamp_min(1e-30))  # waits for both calls
        self.stats.compile_seconds = self._wrap_seconds + time.perf_counter() - started
        tolerance = 1e-4 if self.denoiser.dtype == torch.float32 else 2e-2  # half precision: other roundings
        if not difference <= tolerance:
            warn_once(f"--compile: the compiled {name}'s errors differ from eager ones by {difference:.2g} "
                      f"(relative; at most {tolerance:g} expected); running eager")
            self.denoiser.uncompile()
            self.compile = False
            return eager
        self.denoiser.compile_checked = True
        return errors

    @staticmethod
    def _work_items(work: list[tuple[_Running, Round]]) -> dict[str, np.ndarray]:
        """The wave's (job, condition row, timestep, column, candidate or NULL, prompt) items not yet
        evaluated, as parallel arrays, ordered job by job, then candidate, prompt, timestep."""
        parts = []
        for j, (run, round_) in enumerate(work):
            table, rows = run.table, np.asarray(run.job.rows)
            timesteps = np.asarray(round_.timesteps, dtype=np.int64)
            columns = np.array([table.column(int(t)) for t in timesteps], dtype=np.int64)
            classes = np.asarray(round_.classes, dtype=np.int64)
            c, p, k = np.meshgrid(classes, np.arange(rows.shape[1]), np.arange(len(timesteps)), indexing="ij")
            c, p, k = c.ravel(), p.ravel(), k.ravel()
            todo = np.isnan(table.errors[c, p, columns[k]])
            c, p, k = c[todo], p[todo], k[todo]
            parts.append(dict(job=np.full(len(c), j), row=rows[c, p].astype(np.int64), t=timesteps[k],
                              col=columns[k], cand=c, prompt=p))
            if run.job.null_row is not None:
                todo = np.isnan(table.null_errors[columns])
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
        started = time.perf_counter()
        # one noise row per distinct (job, column) of the wave, gathered per batch by index; each batch fills
        # the rows it needs just before it is queued, so making noise on the CPU (the noise contract)
        # overlaps the device's work on the batches before it
        pairs, first, noise_index = np.unique(np.stack([items["job"], items["col"]], axis=1), axis=0,
                                              return_index=True, return_inverse=True)
        noise_index = noise_index.reshape(-1)
        noise = _NoiseBank(work, pairs, items["t"][first], device)
        x0_bank = torch.stack([run.job.x0 for run, _ in work]).to(device)
        as_device = {key: torch.from_numpy(value).to(device) for key, value in items.items()}
        as_device["noise"] = torch.from_numpy(noise_index.astype(np.int64)).to(device)
        errors = torch.empty(n, device=device)
        for start in range(0, n, self.batch_size):
            noise.fill(noise_index[start:start + self.batch_size])
            take = torch.arange(start, min(start + self.batch_size, n), device=device)
            if self.compile and self.denoiser.compiled and len(take) < self.batch_size:  # one compiled shape
                take = torch.cat([take, take[-1:].expand(self.batch_size - len(take))])
            x0 = x0_bank[as_device["job"][take]]
            eps = noise.bank[as_device["noise"][take]]
            t = as_device["t"][take]
            cond = {key: value[as_device["row"][take]] for key, value in conditions.items()}
            if self.denoiser.compiled and not self.denoiser.compile_checked:
                batch_errors = self._first_compiled_call(x0, eps, t, cond)
            else:
                batch_errors = self.denoiser.error(x0, eps, t, cond, self.loss, self.target)
            if self.weights is not None:
                batch_errors = batch_errors * self.weights[t]
            real = min(self.batch_size, n - start)
            errors[start:start + real] = batch_errors[:real]
            self.stats.network_calls += 1
            self.stats.evaluations += real
            self.stats.padded += len(take) - real
        host = errors.to("cpu", non_blocking=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        noise.release()
        self.stats.network_seconds += time.perf_counter() - started
        values = host.numpy().astype(np.float64)
        bounds = np.searchsorted(items["job"], np.arange(len(work) + 1))  # items are grouped by job
        for j, (run, _) in enumerate(work):  # scatter into each job's table with fancy indexing
            mine = slice(bounds[j], bounds[j + 1])
            cand, prompt, col, value = items["cand"][mine], items["prompt"][mine], items["col"][mine], values[mine]
            null = cand == NULL
            run.table.errors[cand[~null], prompt[~null], col[~null]] = value[~null]
            if null.any():
                run.table.null_errors[col[null]] = value[null]
