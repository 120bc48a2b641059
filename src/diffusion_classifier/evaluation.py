"""Classification runs: a labelled dataset, a classifier, and one resumable results store in RUN_DIR
(store.py). `metrics.json` is written atomically at the end."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .classifier import DiffusionClassifier
from .data import LabelledImages, preprocess
from .distributed import ProcessGroup
from .errors import UserError
from .probabilities import same_score
from .runtime import atomic_write_text
from .store import ResultsStore


def metrics_from_records(records: list[dict], n_classes: int) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return {"accuracy": None, "mean_per_class_accuracy": None, "images": 0, "failed": len(records), "ties": 0,
                "nfe_per_image": None, "seconds_per_image": None}
    labels = np.array([r["label"] for r in ok])
    correct = np.array([r["correct"] for r in ok], dtype=float)
    per_class = [correct[labels == c].mean() for c in range(n_classes) if (labels == c).any()]
    return {"accuracy": float(correct.mean()), "mean_per_class_accuracy": float(np.mean(per_class)),
            "images": len(ok), "failed": len(records) - len(ok), "ties": sum(map(_tied, ok)),
            "nfe_per_image": float(np.mean([r["nfe"] for r in ok])),
            "seconds_per_image": float(np.mean([r["seconds"] for r in ok]))}


def _tied(record: dict) -> bool:
    """Whether an image's two best classes scored exactly alike (its prediction is then a tie, counted as such)."""
    ranking = json.loads(record["ranking"]) if record.get("ranking") else []
    return len(ranking) > 1 and same_score(ranking[0][1], ranking[1][1])


def evaluate(classifier: DiffusionClassifier, dataset: LabelledImages, run_dir: str | Path,
             run_config: dict, images_per_batch: int | None = None, progress: bool = True,
             group: ProcessGroup | None = None, reuse: Sequence[str | Path] = (),
             max_new: int | None = None) -> dict | None:
    """Classify every image of `dataset` not yet in the store (at most `max_new` of them); return the metrics of
    everything stored, with "complete" saying whether every image is.

    `reuse`: run directories whose rows are copied first for the images they share with this run.

    Under torch.distributed each rank classifies its share and writes it to the shared store;
    rank 0 waits for the others and returns the merged metrics (other ranks return None).
    """
    group = group or ProcessGroup()
    images_per_batch = images_per_batch or classifier.config.images_per_batch
    config = {**run_config, **classifier.describe()}
    if group.is_main:
        with ResultsStore(run_dir, config) as store:  # creates the store and records the configuration once
            for other in reuse:
                copied = store.reuse_from(other, dataset.ids)
                print(f"reused {copied} image(s) from {other}", flush=True)
    group.barrier()
    with ResultsStore(run_dir, config) as store:
        done = store.done_indices()
        todo = group.shard(store.pending(len(dataset), max_new))
        _classify_into(store, classifier, dataset, todo, images_per_batch, progress, group)
        group.barrier()
        if not group.is_main:
            return None
        records = store.records()
    metrics = metrics_from_records(records, len(classifier.classes_))
    metrics["images_this_run"] = len(records) - len(done)
    metrics["complete"] = len(records) == len(dataset)
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", Path(run_dir) / "metrics.json")
    return metrics


def _prepare(dataset: LabelledImages, batch: list[int], classifier: DiffusionClassifier, store: ResultsStore):
    """Decode and preprocess one batch of images: (failed rows, good indices, pixels or None)."""
    denoiser = classifier.denoiser
    failed, good, pixels = [], [], []
    for i in batch:
        try:
            pixels.append(preprocess([dataset.items[i]], denoiser.image_size, denoiser.image_channels,
                                     classifier.config.interpolation)[0])
            good.append(i)
        except UserError as exc:
            failed.append(store.failed_row(i, dataset.ids[i], dataset.labels[i], str(exc)))
    return failed, good, torch.stack(pixels) if pixels else None


def _classify_into(store: ResultsStore, classifier: DiffusionClassifier, dataset: LabelledImages, todo: list[int],
                   images_per_batch: int, progress: bool, group: ProcessGroup) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    bar = tqdm(total=len(todo), disable=not progress or not group.is_main, unit="img", dynamic_ncols=True,
               desc="evaluate" if group.world_size == 1 else f"evaluate (rank 0 of {group.world_size})")
    correct = seen = 0
    batches = [todo[start:start + images_per_batch] for start in range(0, len(todo), images_per_batch)]
    # the next batch is decoded and preprocessed in a background thread while this one is scored
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess") as pool:
        upcoming = pool.submit(_prepare, dataset, batches[0], classifier, store) if batches else None
        for k, batch in enumerate(batches):
            rows, good, pixels = upcoming.result()
            if k + 1 < len(batches):
                upcoming = pool.submit(_prepare, dataset, batches[k + 1], classifier, store)
            started = time.perf_counter()
            if good:
                results = classifier.classify_pixels(pixels, [dataset.ids[i] for i in good], started=started)
                for i, result in zip(good, results):
                    rows.append(store.row(i, dataset.ids[i], dataset.labels[i], result))
                    correct += int(result.prediction_index == dataset.labels[i])
            store.add(rows)
            seen += len(good)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / max(seen, 1):.3f}")
    bar.close()
