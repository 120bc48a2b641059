"""The results store of a run directory: one SQLite file, `results.sqlite`.

  * table `run`: key/value JSON of the run's configuration (model, labels, prompts, the scoring
    configuration's describe(), package versions). Resuming with another configuration is an error.
  * table `results`: one row per item index: id, label, prediction, correct, nfe, seconds, ranking (JSON),
    mean errors and the full error matrix (.npy bytes) with its timesteps (JSON), or status 'failed' with
    the reason for unreadable images. Classification rows fill every column; other tasks leave label,
    prediction and correct as they define them and keep their outcome in `ranking`.
Each batch is committed in one transaction, so a kill at any moment loses at most the batch in flight and
never leaves a half-written row.

A run can take over the rows of earlier runs (`reuse_from`): those whose configuration differs only in
the image list, for the items they share (matched by id). The noise each image gets follows its pixels
and the seed, not its position, so a reused row is what this run would have computed.
"""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .errors import UserError

STORE_NAME = "results.sqlite"
IMAGE_LIST_KEYS = {"images", "image_ids_sha256"}  # what may differ between a run and one it reuses


def array_bytes(array: np.ndarray, dtype=np.float64) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=dtype), allow_pickle=False)
    return buffer.getvalue()


def errors_bytes(errors: np.ndarray) -> bytes:
    """An error matrix as float32: the network's errors are float32 values, so this is lossless (checked) and
    halves what a stored run adds to the repository. Older runs hold float64; both read back as stored."""
    compact = np.asarray(errors, dtype=np.float32)
    if not np.array_equal(compact, errors, equal_nan=True):
        return array_bytes(errors)  # a float64 error from elsewhere: keep it exactly
    return array_bytes(compact, np.float32)


def array_from_bytes(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False).astype(np.float64)  # float32 matrices compute as before


def package_versions() -> dict:
    import diffusers
    import transformers

    from ._version import __version__

    return {"diffusion_classifier": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


class Row(NamedTuple):
    """One stored item: an image (classification) or an example (image-text tasks). Classification fills
    every field; other tasks leave label, prediction and correct as they define them and keep their outcome in
    `ranking` (JSON)."""

    idx: int
    id: str
    label: int | None
    prediction: int | None
    correct: int | None
    nfe: int
    seconds: float
    ranking: str | None  # JSON: classification [[class, score], ...] best first; other tasks their outcome
    mean_errors: bytes | None  # .npy bytes
    errors: bytes | None  # .npy bytes of the full error matrix
    timesteps: str | None  # JSON: the timestep of each error column
    status: str  # "ok", or "failed" (an unreadable image)
    error: str | None  # why it failed

    @classmethod
    def failed(cls, idx: int, item_id: str, label: int | None, reason: str) -> Row:
        return cls(idx, item_id, label, None, None, 0, 0.0, None, None, None, None, "failed", reason)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def error_matrix(self) -> np.ndarray:
        return array_from_bytes(self.errors)

    def timestep_list(self) -> list:
        return json.loads(self.timesteps)


class ResultsStore:
    """The SQLite results store of one run directory."""

    def __init__(self, run_dir: str | Path, config: dict | None = None):
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file; a run directory is needed")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory {self.run_dir}: {exc.strerror}") from None
        self.path = self.run_dir / STORE_NAME
        self.db = sqlite3.connect(self.path, timeout=120)  # other ranks may hold the write lock briefly
        self.db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a committed batch survives the process being killed (SIGKILL, OOM); only
        # an OS crash or power loss can lose the last batches, never corrupt the store. FULL would fsync on
        # every commit.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS run (key TEXT PRIMARY KEY, value TEXT)")
        self.db.execute("""CREATE TABLE IF NOT EXISTS results (
            idx INTEGER PRIMARY KEY, id TEXT, label INTEGER, prediction INTEGER, correct INTEGER,
            nfe INTEGER, seconds REAL, ranking TEXT, mean_errors BLOB, errors BLOB, timesteps TEXT,
            status TEXT NOT NULL, error TEXT)""")
        self.db.commit()
        if config is not None:
            try:
                self._check_config(config)
            except BaseException:
                self.db.close()
                raise

    def _check_config(self, config: dict) -> None:
        row = self.db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()
        if row is None:
            with self.db:
                self.db.execute("INSERT INTO run VALUES ('config', ?)", (json.dumps(config, sort_keys=True),))
                self.db.execute("INSERT OR REPLACE INTO run VALUES ('versions', ?)", (json.dumps(package_versions()),))
            return
        changed = differing_keys(json.loads(row[0]), json.loads(json.dumps(config, sort_keys=True)))
        if changed:
            raise UserError(f"{self.run_dir} holds a run with another configuration (differs in: "
                            f"{', '.join(changed)}); use a new --out directory")

    def config(self) -> dict:
        row = self.db.execute("SELECT value FROM run WHERE key = 'config'").fetchone()
        return json.loads(row[0]) if row else {}

    def done_indices(self) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT idx FROM results")}

    def pending(self, n_items: int, max_new: int | None = None) -> list[int]:
        """Indices of the run's items not stored yet, in order (the first `max_new` of them)."""
        done = self.done_indices()
        todo = [i for i in range(n_items) if i not in done]
        return todo if max_new is None else todo[:max_new]

    def add(self, rows: list[Row]) -> None:
        with self.db:  # one transaction per batch
            self.db.executemany(f"INSERT OR REPLACE INTO results ({', '.join(Row._fields)}) VALUES "
                                f"({', '.join('?' * len(Row._fields))})", rows)

    def rows(self, ok_only: bool = False) -> list[Row]:
        """Every stored row (or only the scored ones), in item order."""
        where = " WHERE status = 'ok'" if ok_only else ""
        return [Row(*row) for row in self.db.execute(f"SELECT {', '.join(Row._fields)} FROM results{where} "
                                                     "ORDER BY idx")]

    def records(self) -> list[dict]:
        """The rows without their error blobs, as dicts."""
        cursor = self.db.execute("SELECT idx, id, label, prediction, correct, nfe, seconds, status, error, ranking "
                                 "FROM results ORDER BY idx")  # no error blobs: the records of a large run stay small
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
        with ResultsStore(other_dir) as other:
            differing = [k for k in differing_keys(self.config(), other.config()) if k not in IMAGE_LIST_KEYS]
            if differing:
                raise UserError(f"--reuse {other_dir}: that run has another configuration (differs in: "
                                f"{', '.join(differing)})")
            position = {image_id: i for i, image_id in enumerate(ids)}
            done = self.done_indices()
            rows = [row._replace(idx=position[row.id]) for row in other.rows()
                    if row.id in position and position[row.id] not in done]
        self.add(rows)
        return len(rows)

    def compact(self) -> None:
        """Error matrices as float32 where that is lossless (older runs stored float64), the WAL folded in (one
        file to commit) and small pages (rows of about 3 KB waste most of 4 KB ones): the same results in about
        half the bytes."""
        with self.db:
            rows = self.db.execute("SELECT idx, errors FROM results WHERE errors IS NOT NULL").fetchall()
            self.db.executemany("UPDATE results SET errors = ? WHERE idx = ?",
                                [(errors_bytes(array_from_bytes(blob)), idx) for idx, blob in rows])
        self.db.execute("PRAGMA journal_mode=DELETE")
        self.db.execute("PRAGMA page_size=1024")
        self.db.execute("VACUUM")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def differing_keys(a: dict, b: dict) -> list[str]:
    """Keys whose values differ; a key one side lacks counts as None (settings recorded as None when
    inactive match runs stored before the setting was recorded)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def read_run(run_dir: str | Path) -> tuple[dict, list[Row]]:
    """(configuration, rows) of a stored run, for commands that read runs without a model (report, calibrate)."""
    run_dir = Path(run_dir)
    if not (run_dir / STORE_NAME).is_file():
        raise UserError(f"{run_dir} holds no {STORE_NAME} (not an evaluate run directory)")
    with ResultsStore(run_dir) as store:
        return store.config(), store.rows()
