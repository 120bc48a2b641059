"""Evaluation runs: a dataset, a classifier, and one resumable results store in RUN_DIR.

The store is one SQLite file, `results.sqlite`:
  * table `run`: key/value JSON of the run's configuration (model, labels, prompts,
    strategy, loss, seed, package versions). Resuming with another configuration is an error.
  * table `results`: one row per image index: id, label, prediction, correct, nfe, seconds,
    ranking (JSON), mean errors and the full error matrix (float64 .npy bytes) with its
    timesteps (JSON), or status 'failed' with the reason for unreadable images.
Each batch of images is committed in one transaction, so a kill at any moment loses at
most the batch in flight and never leaves a half-written row. `metrics.json` is written
atomically at the end.

A run can take over the rows of earlier runs (`reuse`): those whose configuration differs only in
the image list, for the images they share (matched by id). The noise each image gets follows its
pixels and the seed, not its position, so a reused row is what this run would have computed.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import torch

from .classifier import Classification, DiffusionClassifier
from .data import LabelledImages, preprocess
from .distributed import ProcessGroup
from .errors import UserError
from .runtime import atomic_write_text

STORE_NAME = "results.sqlite"
IMAGE_LIST_KEYS = {"images", "image_ids_sha256"}  # what may differ between a run and one it reuses


def _array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float64), allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def package_versions() -> dict:
    import diffusers
    import transformers

    from . import __version__

    return {"diffusion_classifier": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


class ResultsStore:
    """The SQLite results store of one run directory."""

    def __init__(self, run_dir: str | Path, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / STORE_NAME
        self.db = sqlite3.connect(self.path, timeout=120)  # other ranks may hold the write lock briefly
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("""CREATE TABLE IF NOT EXISTS results (
            idx INTEGER PRIMARY KEY, id TEXT, label INTEGER, prediction INTEGER, correct INTEGER,
            nfe INTEGER, seconds REAL, ranking TEXT, mean_errors BLOB, errors BLOB, timesteps TEXT,
            status TEXT NOT NULL, error TEXT)""")
        self.db.commit()
        if config is not None:
            self._check_config(config)

    def _check_config(self, config: dict) -> None:
        row = self.db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO run VALUES ('config', ?)", (json.dumps(config, sort_keys=True),))
                self.db.execute("INSERT OR REPLACE INTO run VALUES ('versions', ?)", (json.dumps(package_versions()),))
            return
        stored = json.loads(row[0])
        if stored != json.loads(json.dumps(config, sort_keys=True)):
            changed = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            raise UserError(f"{self.run_dir} holds a run with another configuration (differs in: "
                            f"{', '.join(changed)}); use a new --out directory")

    def config(self) -> dict:
        row = self.db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()
        return json.loads(row[0]) if row else {}

    def done_indices(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT idx FROM results")}

    def add(self, rows: list[tuple]) -> None:
        with self.db:  # one transaction per batch
            self.db.executemany("INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    @staticmethod
    def row(idx: int, image_id: str, label: int, result: Classification) -> tuple:
        ranking = json.dumps([[name, score] for name, score in result.ranking])
        return (idx, image_id, int(label), result.prediction_index, int(result.prediction_index == label),
                result.nfe, result.seconds, ranking, _array_bytes(result.mean_errors), _array_bytes(result.errors),
                json.dumps(result.timesteps), "ok", None)

    @staticmethod
    def failed_row(idx: int, image_id: str, label: int, reason: str) -> tuple:
        return (idx, image_id, int(label), None, None, 0, 0.0, None, None, None, None, "failed", reason)

    def records(self) -> list[dict]:
        cursor = self.db.execute("SELECT idx, id, label, prediction, correct, nfe, seconds, status, error "
                                 "FROM results ORDER BY idx")
        keys = [d[0] for d in cursor.description]
        return [dict(zip(keys, row)) for row in cursor]

    def error_matrices(self) -> list[tuple[int, np.ndarray, list[int]]]:
        return [(idx, array_from_bytes(blob), json.loads(ts)) for idx, blob, ts in
                self.db.execute("SELECT idx, errors, timesteps FROM results WHERE status = 'ok' ORDER BY idx")]

    def error_matrices_by_id(self) -> dict[str, tuple[np.ndarray, list[int]]]:
        """{image id: (error matrix, timesteps)} of the classified images."""
        return {image_id: (array_from_bytes(blob), json.loads(ts)) for image_id, blob, ts in
                self.db.execute("SELECT id, errors, timesteps FROM results WHERE status = 'ok'")}

    def reuse_from(self, other_dir: str | Path, ids: list[str]) -> int:
        """Copy the other run's rows of the images in `ids` not yet here; return how many were copied."""
        other_path = Path(other_dir) / STORE_NAME
        if not other_path.exists():
            raise UserError(f"--reuse {other_dir}: no {STORE_NAME} there")
        other = ResultsStore(other_dir)
        try:
            mine, theirs = self.config(), other.config()
            differing = sorted(k for k in set(mine) | set(theirs)
                               if k not in IMAGE_LIST_KEYS and mine.get(k) != theirs.get(k))
            if differing:
                raise UserError(f"--reuse {other_dir}: that run has another configuration (differs in: "
                                f"{', '.join(differing)})")
            position = {image_id: i for i, image_id in enumerate(ids)}
            done = self.done_indices()
            rows = [(position[row[1]], *row[1:]) for row in other.db.execute("SELECT * FROM results")
                    if row[1] in position and position[row[1]] not in done]
        finally:
            other.close()
        self.add(rows)
        return len(rows)

    def close(self) -> None:
        self.db.close()


def metrics_from_records(records: list[dict], n_classes: int) -> dict:
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return {"accuracy": None, "mean_per_class_accuracy": None, "images": 0, "failed": len(records),
                "nfe_per_image": None, "seconds_per_image": None}
    labels = np.array([r["label"] for r in ok])
    correct = np.array([r["correct"] for r in ok], dtype=float)
    per_class = [correct[labels == c].mean() for c in range(n_classes) if (labels == c).any()]
    return {"accuracy": float(correct.mean()), "mean_per_class_accuracy": float(np.mean(per_class)),
            "images": len(ok), "failed": len(records) - len(ok),
            "nfe_per_image": float(np.mean([r["nfe"] for r in ok])),
            "seconds_per_image": float(np.mean([r["seconds"] for r in ok]))}


def evaluate(classifier: DiffusionClassifier, dataset: LabelledImages, run_dir: str | Path,
             run_config: dict, images_per_batch: int = 32, progress: bool = True,
             group: ProcessGroup | None = None, reuse: list[str | Path] = ()) -> dict | None:
    """Classify every image of `dataset` not yet in the store; return the metrics of the whole run.

    `reuse`: run directories whose rows are copied first for the images they share with this run.

    Under torch.distributed each rank classifies its share and writes it to the shared store;
    rank 0 waits for the others and returns the merged metrics (other ranks return None).
    """
    from tqdm import tqdm

    group = group or ProcessGroup()
    config = {**run_config, **classifier.describe()}
    if group.is_main:
        store = ResultsStore(run_dir, config)  # creates the store and records the configuration once
        try:
            for other in reuse:
                copied = store.reuse_from(other, dataset.ids)
                print(f"reused {copied} image(s) from {other}", flush=True)
        finally:
            store.close()
    group.barrier()
    store = ResultsStore(run_dir, config)
    done = store.done_indices()
    todo = group.shard([i for i in range(len(dataset)) if i not in done])
    denoiser = classifier.denoiser
    bar = tqdm(total=len(todo), disable=not progress or not group.is_main, unit="img", dynamic_ncols=True,
               desc="evaluate" if group.world_size == 1 else f"evaluate (rank 0 of {group.world_size})")
    correct = seen = 0
    try:
        for start in range(0, len(todo), images_per_batch):
            batch = todo[start:start + images_per_batch]
            started = time.perf_counter()
            rows, good, pixels = [], [], []
            for i in batch:
                try:
                    pixels.append(preprocess([dataset.items[i]], denoiser.resolution, denoiser.image_channels,
                                             classifier.interpolation)[0])
                    good.append(i)
                except UserError as exc:
                    rows.append(store.failed_row(i, dataset.ids[i], dataset.labels[i], str(exc)))
            if good:
                results = classifier.classify_pixels(torch.stack(pixels), [dataset.ids[i] for i in good],
                                                     started=started)
                for i, result in zip(good, results):
                    rows.append(store.row(i, dataset.ids[i], dataset.labels[i], result))
                    correct += int(result.prediction_index == dataset.labels[i])
            store.add(rows)
            seen += len(good)
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / max(seen, 1):.3f}")
        bar.close()
        group.barrier()
        metrics = None
        if group.is_main:
            records = store.records()
            metrics = metrics_from_records(records, len(classifier.classes_))
            metrics["images_this_run"] = len(records) - len(done)
    finally:
        store.close()
    if metrics is not None:
        atomic_write_text(json.dumps(metrics, indent=2) + "\n", Path(run_dir) / "metrics.json")
    return metrics
