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

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import ScoringConfig
from .data import LabelledImages, load_dataset
from .denoisers import Denoiser
from .errors import UserError
from .labels import validate_labels, validate_templates
from .presets import DatasetPreset, preset, preset_class_ids, scoring_config

TASKS = ("classification", "winoground", "pairs")
IMAGES_PER_EXAMPLE = {"winoground": 2, "pairs": 1}
CLASSIFICATION_ONLY = {"labels": "--labels / --labels-file", "templates": "--template / --templates-file",
                       "preset": "--preset", "subset": "--subset", "calibration": "--calibration",
                       "temperature": "--temperature"}  # field: the options that set it


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
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise UserError("--limit must be at least 1")
        if self.task != "classification":
            for name, flags in CLASSIFICATION_ONLY.items():
                if getattr(self, name) is not None:
                    raise UserError(f"{flags} applies to classification, not --task {self.task}")
        elif self.normalize is not None:
            raise UserError("--normalize applies to --task winoground, not classification")
        if self.task == "pairs" and self.normalize is not None:
            raise UserError("--normalize applies to --task winoground: a pairs example compares two captions of "
                            "one image, which the empty prompt's error cannot change")
        if self.normalize not in (None, "none", "unconditional"):
            raise UserError(f"unknown normalisation {self.normalize!r}; choose none or unconditional")
        if self.labels is not None:
            validate_labels(self.labels)
        if self.templates is not None:
            validate_templates(self.templates)
        if self.preset is not None:
            preset(self.preset)  # an unknown name fails before anything loads

    @property
    def dataset_preset(self) -> DatasetPreset | None:
        return preset(self.preset) if self.preset else None

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
    items = _load_items(run)
    scoring = run.scoring_config()  # validate the settings before loading a model
    if run.task == "classification":
        from .calibration import read_calibration

        labels = run.labels if run.labels is not None or run.preset else items.class_names
        check_candidates(run.model, labels, run.templates)
        if run.calibration:
            read_calibration(run.calibration)
    with process_group() as group:
        if denoiser is None:
            denoiser = load_model(run.model, run.device, run.dtype, group, variant=run.variant, lora=run.lora,
                                  lora_scale=run.lora_scale, base_config=run.base_config,
                                  text_encoders=run.text_encoders)
        if run.resolution is not None:
            denoiser.set_resolution(run.resolution)
        identity = _identity(run, items, denoiser)
        if run.task == "classification":
            from .evaluation import evaluate

            classifier = make_classifier(denoiser, scoring, _candidate_labels(run, items, denoiser), run.templates,
                                         run.preset, run.temperature, run.calibration)
            metrics = evaluate(classifier, items, run.out, identity, progress=progress, group=group,
                               reuse=run.reuse, max_new=max_new)
        else:
            from .matching import ImageTextMatcher
            from .matching_runs import evaluate_matching

            with_null = run.task == "winoground" and run.normalize != "none"
            matcher = ImageTextMatcher(denoiser, config=scoring, with_null=with_null)
            per_batch = max(1, scoring.images_per_batch // IMAGES_PER_EXAMPLE[run.task])
            metrics = evaluate_matching(matcher, run.task, items, run.out, identity, examples_per_batch=per_batch,
                                        progress=progress, group=group, normalize=run.normalize, max_new=max_new)
    return metrics


def check_candidates(model: str | Path, labels: Sequence | None, templates: Sequence[str] | None) -> None:
    """What can be checked about the candidates before the model loads (built-in models and local directories:
    their model_index.json says whether they take text and names their classes); the classifier checks again."""
    from .labels import TEMPLATES_NEED_TEXT, class_ids
    from .loading import peek_conditioning

    peeked = peek_conditioning(model)
    if peeked is None or peeked[0] == "text":
        return
    if templates:
        raise UserError(TEMPLATES_NEED_TEXT)
    names = peeked[1]
    if labels is not None and names:
        class_ids(names, labels, len(names))


def load_model(model: str | Path, device: str = "auto", dtype: str = "auto", group=None, **options) -> Denoiser:
    """A model on a device by name ("auto": CUDA when present), one GPU per process under torchrun; options:
    load_denoiser's (variant, lora, lora_scale, base_config, text_encoders)."""
    from .loading import load_denoiser
    from .runtime import parse_device, parse_dtype

    where = parse_device(device)
    if group is not None:
        where = group.device(where)
    return load_denoiser(model, device=where, dtype=parse_dtype(dtype, where), **options)


def make_classifier(denoiser: Denoiser, scoring: ScoringConfig, labels: Sequence | None = None,
                    templates: Sequence[str] | None = None, preset: str | DatasetPreset | None = None,
                    temperature: float | None = None, calibration: str | Path | None = None):
    """A classifier from a run's (or `classify`'s) settings. Class-conditional models take no templates (the
    classifier refuses them); a preset gives them its scoring settings (resolved into `scoring` already) and
    is refused by the classifier when its classes are not the model's; probabilities come from the
    calibration file when given, else the temperature (None: the model's stored one)."""
    from .calibration import read_calibration
    from .classifier import DiffusionClassifier

    fitted = read_calibration(calibration) if calibration else None
    return DiffusionClassifier(denoiser, labels=labels, templates=templates, config=scoring, temperature=temperature,
                               calibration=fitted, preset=preset)


def _candidate_labels(run: EvaluationRun, dataset: LabelledImages, denoiser: Denoiser) -> list | None:
    """The classifier's labels for a dataset: the given ones, the dataset's classes, or (None) the preset's own
    names and prompts; a class-conditional model under a preset takes class ids in the preset's order."""
    if run.labels is not None:
        return list(run.labels)
    if not run.preset:
        return dataset.class_names
    return preset_class_ids(run.dataset_preset, denoiser) if denoiser.conditioning != "text" else None


def _load_items(run: EvaluationRun):
    if run.task != "classification":
        from .matching_data import load_caption_pairs, load_winoground

        examples = load_winoground(run.data) if run.task == "winoground" else load_caption_pairs(run.data)
        return examples[:run.limit] if run.limit is not None else examples
    dataset = load_dataset(str(run.data), run.split)
    if run.subset is not None:
        dataset = dataset.subset(run.subset)
    if run.limit is not None:
        dataset = dataset.subset(range(min(run.limit, len(dataset))))
    if run.labels is not None:
        labels = validate_labels(run.labels)
        if len(labels) != len(dataset.class_names) and set(dataset.class_names) <= set(labels):
            # more candidates than the data has classes (a test subset of many classes): matched by name
            position = {name: i for i, name in enumerate(labels)}
            dataset.labels = np.array([position[dataset.class_names[k]] for k in dataset.labels])
        elif len(labels) != len(dataset.class_names):
            raise UserError(f"expected {len(dataset.class_names)} labels (one per class of the data, in class-index "
                            f"order), or labels that include every class name of the data; got {len(labels)}")
        dataset.class_names = labels
    elif run.preset:
        dataset = run.dataset_preset.relabel(dataset)
    return dataset


def _digest(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()


def _identity(run: EvaluationRun, items, denoiser: Denoiser) -> dict:
    """What names a run besides its scoring settings: model, data and the exact image (example) list."""
    from .loading import weights_fingerprint

    weights = weights_fingerprint(denoiser.source_dir, denoiser.weight_files)
    model = {"model": str(run.model), "data": str(run.data)}
    if denoiser.fine_tunes:  # LoRAs (source, scale, sha256) and single files; absent before there were any
        model["fine_tunes"] = denoiser.fine_tunes
    if denoiser.weights_variant:  # fp16 files (the weights' fingerprint differs too; this says why)
        model["weights_variant"] = denoiser.weights_variant
    if run.task == "classification":
        return {**model, "split": run.split, "images": len(items), "image_ids_sha256": _digest(items.ids),
                "model_weights_sha256": weights}
    return {**model, "examples": len(items), "example_ids_sha256": _digest([ex.id for ex in items]),
            "model_weights_sha256": weights}
