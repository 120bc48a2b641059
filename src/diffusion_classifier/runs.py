"""Evaluation runs: what is scored (model, data, candidates, preset, scoring settings, task) and the one
call that starts or resumes it.

    from diffusion_classifier.runs import EvaluationRun, run_evaluation

    run = EvaluationRun(model="fashion-mnist-class", data="fashion-mnist", out="runs/fm", limit=200)
    metrics = run_evaluation(run)  # starts, or resumes what RUN_DIR/results.sqlite already holds

A run's identity is its spec's model, data and image list plus every setting that can change a result
(the classifier's or matcher's describe()); results.sqlite records it, and resuming with a different one
is refused (store.py). Settings that change only speed (batch sizes, --compile, device placement) may
differ between sessions of one run. `evaluate` in the CLI is this call; so are the benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .adapters.denoiser import Denoiser
from .adapters.loading import Placement
from .engine.config import ScoringConfig
from .errors import UserError
from .runtime import atomic_write_text
from .tasks import TASKS, get_task
from .tasks.labels import validate_labels, validate_templates
from .tasks.presets import DatasetPreset, preset, scoring_config

RUN_FILE = "run.json"
# fields that only some tasks take (Task.options): the options that set them
TASK_OPTIONS = {"labels": "--labels / --labels-file", "templates": "--template / --templates-file",
                "preset": "--preset", "subset": "--subset", "calibration": "--calibration",
                "temperature": "--temperature", "normalize": "--normalize"}


@dataclass(frozen=True)
class EvaluationRun:
    """One resumable evaluation: a model on a dataset, stored in `out`.

    task: classification (labelled images: `data` is 'fashion-mnist', an ImageFolder, a manifest or a saved
        Hugging Face dataset), winoground or pairs (`data` a manifest of such examples).
    subset / limit: dataset indices to use, then only the first `limit` of them.
    labels / templates / preset: the candidates (classification). A preset gives the paper's class names,
        prompts, staged schedule and loss; labels or templates replace its names or prompts, and a strategy
        in `scoring` replaces its schedule and loss.
    scoring: a ScoringConfig, or its fields as a mapping (strategy and loss left out: the preset's, else
        the defaults).
    temperature / calibration: probability settings stored with the model or fitted by `calibrate`
        (calibration: a calibration.json or the run directory holding one).
    normalize: winoground's image-score normalisation (none or unconditional, the default).
    reuse: earlier run directories whose rows for shared images are taken over.
    variant / lora / lora_scale / base_config: which weight files, LoRAs fused in, and a single-file checkpoint's
        base pipeline (load_denoiser).
    """

    model: str | Path
    data: str | Path
    out: str | Path
    task: str = "classification"
    split: str = "test"
    subset: Sequence[int] | None = None
    limit: int | None = None
    labels: Sequence[str] | None = None
    templates: Sequence[str] | None = None
    preset: str | None = None
    scoring: ScoringConfig | Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    resolution: int | None = None
    temperature: float | None = None
    calibration: str | Path | None = None
    normalize: str | None = None
    reuse: Sequence[str | Path] = ()
    variant: str | None = "auto"
    lora: Sequence[str | Path] = ()
    lora_scale: Sequence[float] = ()
    base_config: str | Path | None = None
    text_encoders: str = "auto"  # where they live on a GPU; not part of the run's identity (float rounding only)

    def __post_init__(self):
        task = get_task(self.task)
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be at least 1")
        for name, flags in TASK_OPTIONS.items():
            if getattr(self, name) is not None and name not in task.options:
                owners = [other for other in TASKS if name in get_task(other).options]
                raise UserError(f"{flags} applies to {' and '.join(get_task(o).phrase for o in owners)}, not "
                                f"{task.phrase}")
        if self.normalize not in (None, "none", "unconditional"):
            raise UserError(f"unknown normalisation {self.normalize!r}; choose none or unconditional")
        if self.labels is not None:
            validate_labels(self.labels)
        if self.templates is not None:
            validate_templates(self.templates)
        if self.preset is not None:
            preset(self.preset)  # an unknown name fails before anything loads

    @property
    def placement(self) -> Placement:
        return Placement(self.device, self.dtype, self.resolution)

    @property
    def dataset_preset(self) -> DatasetPreset | None:
        return preset(self.preset) if self.preset else None

    def to_dict(self) -> dict:
        """The run as plain JSON values, its scoring settings resolved (a preset's schedule included)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "scoring":
                value = self.scoring_config().to_dict()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, (tuple, list)):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> EvaluationRun:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown run setting(s): {', '.join(unknown)}")
        values = dict(values)
        if isinstance(values.get("scoring"), Mapping):
            values["scoring"] = ScoringConfig.from_dict(values["scoring"])
        for name in ("subset", "labels", "templates", "reuse", "lora", "lora_scale"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls(**values)

    def save(self, path: str | Path) -> None:
        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> EvaluationRun:
        """A run saved by save() (every evaluate writes RUN_DIR/run.json), to start or resume it again."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read a run from {path}: {exc}") from None
        if not isinstance(values, dict):
            raise UserError(f"{path} does not hold a run (a JSON object of its settings)")
        return cls.from_dict(values)

    def scoring_config(self) -> ScoringConfig:
        """The scoring settings: as given, with the preset's schedule and loss where no strategy is."""
        if isinstance(self.scoring, ScoringConfig):
            return self.scoring
        return scoring_config(self.dataset_preset, **self.scoring)


def run_evaluation(run: EvaluationRun, denoiser: Denoiser | None = None, progress: bool = True,
                   max_new: int | None = None) -> dict | None:
    """Start or resume `run`; return the metrics of everything stored (rank 0; other ranks return None).

    denoiser: an already loaded model (it must be `run.model`'s); by default it is loaded on run.device.
    max_new: score at most this many not-yet-stored images (examples), then return; a later call resumes.
        The metrics say how many are stored ("images" / "examples") and whether the run is "complete".
    Under torchrun or accelerate launch every process takes its share of what is left.
    """
    from .distributed import process_group

    if max_new is not None and max_new < 0:
        raise UserError("max_new must be at least 0")
    task = get_task(run.task)
    items = task.load_items(run)
    scoring = run.scoring_config()  # validate the settings before loading a model
    task.check(run, items)
    with process_group() as group:
        placement = run.placement
        if denoiser is None:
            denoiser = placement.load(run.model, group, variant=run.variant, lora=run.lora,
                                      lora_scale=run.lora_scale, base_config=run.base_config,
                                      text_encoders=run.text_encoders)
        else:
            denoiser = placement.apply(denoiser)  # the caller's model stays as it was
        scorer = task.scorer(run, items, denoiser, scoring)
        config = {**_identity(run, task, items, denoiser), **scorer.describe()}
        return _score_into_store(task, scorer, items, run, config, task.batch_size(scoring), group, progress,
                                 max_new)


def _score_into_store(task, scorer, items, run: EvaluationRun, config: dict, batch_size: int, group,
                      progress: bool, max_new: int | None) -> dict | None:
    """The one loop of every task: create (or check) the store, take over reused rows, score what is not stored
    yet in batches (each committed at once; the next batch prepared in a background thread), then compute the
    metrics of every stored row and write metrics.json (rank 0). RUN_DIR/run.json records the run's settings
    (EvaluationRun.load starts it again)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .store import ResultsStore

    out, ids = run.out, task.item_ids(items)
    if group.is_main:
        with ResultsStore(out, config) as store:  # creates the store and records the configuration once
            run.save(Path(out) / RUN_FILE)
            for other in run.reuse:
                copied = store.reuse_from(other, ids)
                print(f"reused {copied} {task.unit}(s) from {other}", flush=True)
    group.barrier()
    with ResultsStore(out, config) as store:
        done = store.done_indices()
        todo = group.shard(store.pending(len(items), max_new))
        name = task.name
        bar = tqdm(total=len(todo), disable=not progress or not group.is_main, unit=task.unit[:3],
                   dynamic_ncols=True,
                   desc=name if group.world_size == 1 else f"{name} (rank 0 of {group.world_size})")
        correct = seen = 0
        batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
            upcoming = pool.submit(task.prepare, scorer, items, batches[0]) if batches else None
            for k, batch in enumerate(batches):
                prepared = upcoming.result()
                if k + 1 < len(batches):
                    upcoming = pool.submit(task.prepare, scorer, items, batches[k + 1])
                rows = task.score(scorer, items, batch, prepared)
                store.add(rows)
                scored = [row for row in rows if row.ok]
                correct, seen = correct + sum(row.correct for row in scored), seen + len(scored)
                bar.update(len(batch))
                bar.set_postfix(acc=f"{correct / max(seen, 1):.3f}")
        bar.close()
        group.barrier()
        if not group.is_main:
            return None
        rows = store.rows()
    metrics = task.metrics(rows)
    metrics[f"{task.unit}s_this_run"] = len(rows) - len(done)
    metrics["complete"] = len(rows) == len(items)
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", Path(out) / "metrics.json")
    return metrics


def _identity(run: EvaluationRun, task, items, denoiser: Denoiser) -> dict:
    """What names a run besides its scoring settings: model, data, weights and the exact item list."""
    from .adapters.loading import weights_fingerprint

    model = {"model": str(run.model), "data": str(run.data),
             "model_weights_sha256": weights_fingerprint(denoiser.source_dir, denoiser.weight_files)}
    if denoiser.fine_tunes:  # LoRAs (source, scale, sha256) and single files; absent before there were any
        model["fine_tunes"] = denoiser.fine_tunes
    if denoiser.weights_variant:  # fp16 files (the weights' fingerprint differs too; this says why)
        model["weights_variant"] = denoiser.weights_variant
    return {**model, **task.identity(run, items)}
