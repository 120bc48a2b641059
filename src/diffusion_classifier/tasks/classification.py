"""Classification: labelled images, each ranked among the candidate classes (DiffusionClassifier)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..adapters.denoiser import Denoiser
from ..data import LabelledImages, load_dataset, preprocess
from ..engine.config import ScoringConfig
from ..engine.probabilities import relative_scores, same_score, timestep_gaps
from ..errors import UserError
from ..store import Row, array_bytes, errors_bytes
from .base import Task, digest
from .labels import validate_labels
from .presets import DatasetPreset, preset_class_ids


class ClassificationTask(Task):
    name = "classification"
    unit = "image"
    options = ("labels", "templates", "preset", "subset", "calibration", "temperature")
    phrase = "classification"  # the default task: no --task to name

    def load_items(self, run) -> LabelledImages:
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
                raise UserError(f"expected {len(dataset.class_names)} labels (one per class of the data, in "
                                "class-index order), or labels that include every class name of the data; got "
                                f"{len(labels)}")
            dataset.class_names = labels
        elif run.preset:
            dataset = run.dataset_preset.relabel(dataset)
        return dataset

    def item_ids(self, items: LabelledImages) -> list[str]:
        return list(items.ids)

    def identity(self, run, items: LabelledImages) -> dict:
        return {"split": run.split, "images": len(items), "image_ids_sha256": digest(items.ids)}

    def check(self, run, items: LabelledImages) -> None:
        from .calibration import read_calibration

        labels = run.labels if run.labels is not None or run.preset else items.class_names
        check_candidates(run.model, labels, run.templates)
        if run.calibration:
            read_calibration(run.calibration)

    def scorer(self, run, items: LabelledImages, denoiser: Denoiser, scoring: ScoringConfig):
        return make_classifier(denoiser, scoring, _candidate_labels(run, items, denoiser), run.templates,
                               run.preset, run.temperature, run.calibration)

    def prepare(self, classifier, items: LabelledImages, batch: list[int]):
        """Decode and preprocess a batch: (rows of unreadable images, readable indices, their pixels or None)."""
        denoiser = classifier.denoiser
        failed, good, pixels = [], [], []
        for i in batch:
            try:
                pixels.append(preprocess([items.items[i]], denoiser.image_size, denoiser.image_channels,
                                         classifier.config.interpolation)[0])
                good.append(i)
            except UserError as exc:
                failed.append(Row.failed(i, items.ids[i], int(items.labels[i]), str(exc)))
        return failed, good, torch.stack(pixels) if pixels else None

    def score(self, classifier, items: LabelledImages, batch: list[int], prepared) -> list[Row]:
        rows, good, pixels = prepared
        if good:
            results = classifier.classify_pixels(pixels, [items.ids[i] for i in good])
            rows = rows + [_row(i, items.ids[i], int(items.labels[i]), result) for i, result in zip(good, results)]
        return sorted(rows, key=lambda row: row.idx)

    def metrics(self, rows: list[Row]) -> dict:
        ok = [r for r in rows if r.ok]
        if not ok:
            return {"accuracy": None, "mean_per_class_accuracy": None, "images": 0, "failed": len(rows), "ties": 0,
                    "nfe_per_image": None, "seconds_per_image": None}
        labels = np.array([r.label for r in ok])
        correct = np.array([r.correct for r in ok], dtype=float)
        per_class = [correct[labels == c].mean() for c in np.unique(labels)]
        return {"accuracy": float(correct.mean()), "mean_per_class_accuracy": float(np.mean(per_class)),
                "images": len(ok), "failed": len(rows) - len(ok), "ties": sum(map(_tied, ok)),
                "nfe_per_image": float(np.mean([r.nfe for r in ok])),
                "seconds_per_image": float(np.mean([r.seconds for r in ok]))}

    def summary(self, metrics: dict, seconds: float) -> list[str]:
        if metrics["accuracy"] is None:
            return [f"no image could be classified ({metrics['failed']} failed)"]
        return [f"accuracy {metrics['accuracy']:.4f}  mean per-class accuracy {metrics['mean_per_class_accuracy']:.4f}"
                f"  images {metrics['images']} (failed {metrics['failed']})  NFE/image {metrics['nfe_per_image']:.0f}"
                f"  {metrics['images_this_run'] / max(seconds, 1e-9):.2f} images/s in this run" + ties(metrics)]

    def report(self, run_dir: Path, config: dict, rows: list[Row], aggregate: str | None = None, t_min: int = 0,
               t_max: int | None = None, plots: bool = True) -> dict:
        from .report import classification_report

        return classification_report(run_dir, config, rows, aggregate, t_min, t_max, plots)

    def report_lines(self, report: dict) -> list[str]:
        from .report import classification_report_lines

        return classification_report_lines(report)

    def choices(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        aggregate = config.get("aggregate", "min")
        ok = [r for r in rows if r.ok]
        relative = (np.stack([relative_scores(r.error_matrix(), r.prediction, aggregate) for r in ok]) if ok
                    else np.zeros((0, len(config.get("labels") or []))))
        return relative, np.array([r.label for r in ok], dtype=int)

    def timestep_gaps(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        aggregate = config.get("aggregate", "min")
        ok = [r for r in rows if r.ok]
        grids = {tuple(sorted(r.timestep_list())) for r in ok}
        if len(grids) != 1:
            raise UserError("per-timestep calibration needs the same timesteps for every image (an exhaustive run)")
        gaps = np.stack([timestep_gaps(r.error_matrix(), r.timestep_list(), r.prediction, aggregate) for r in ok])
        return gaps, np.array([r.label for r in ok], dtype=int), list(grids.pop())

    def error_grids(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, list[int]]:
        ok = [r for r in rows if r.ok]
        grids = {tuple(r.timestep_list()) for r in ok}
        if len(grids) != 1 or not ok:
            raise UserError("a first look is fitted on an exhaustive run (the same timesteps for every image)")
        grid = sorted(grids.pop())
        order = np.argsort(ok[0].timestep_list())
        return np.stack([r.error_matrix()[:, :, order] for r in ok]), grid  # columns in grid order


def _row(idx: int, image_id: str, label: int, result) -> Row:
    ranking = json.dumps([[name, score] for name, score in result.ranking])
    return Row(idx, image_id, label, result.prediction_index, int(result.prediction_index == label), result.nfe,
               result.seconds, ranking, array_bytes(result.mean_errors), errors_bytes(result.errors),
               json.dumps(result.timesteps), "ok", None)


def _tied(row: Row) -> bool:
    """Whether an image's two best classes scored exactly alike (its prediction is then a tie, counted as such)."""
    ranking = json.loads(row.ranking) if row.ranking else []
    return len(ranking) > 1 and same_score(ranking[0][1], ranking[1][1])


def ties(metrics: dict) -> str:
    n = metrics.get("ties") or 0
    return f"  ({n} ties, counted as misses: candidates the model cannot tell apart)" if n else ""


def check_candidates(model: str | Path, labels: Sequence | None, templates: Sequence[str] | None) -> None:
    """What can be checked about the candidates before the model loads (built-in models and local directories:
    their model_index.json says whether they take text and names their classes); the classifier checks again."""
    from ..adapters.loading import peek_conditioning
    from .labels import TEMPLATES_NEED_TEXT, class_ids

    peeked = peek_conditioning(model)
    if peeked is None or peeked[0] == "text":
        return
    if templates:
        raise UserError(TEMPLATES_NEED_TEXT)
    names = peeked[1]
    if labels is not None and names:
        class_ids(names, labels, len(names))


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


def _candidate_labels(run, dataset: LabelledImages, denoiser: Denoiser) -> list | None:
    """The classifier's labels for a dataset: the given ones, the dataset's classes, or (None) the preset's own
    names and prompts; a class-conditional model under a preset takes class ids in the preset's order."""
    if run.labels is not None:
        return list(run.labels)
    if not run.preset:
        return dataset.class_names
    return preset_class_ids(run.dataset_preset, denoiser) if denoiser.conditioning != "text" else None
