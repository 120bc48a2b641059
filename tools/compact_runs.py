"""Rewrite stored runs' error matrices as float32 where that is lossless (the network's errors are float32
values; older runs stored them as float64), then VACUUM: the same results in about half the bytes.

    python tools/compact_runs.py benchmarks/runs/*/
"""

import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusion_classifier.store import STORE_NAME, array_from_bytes, errors_bytes  # noqa: E402


def compact(run_dir: Path) -> tuple[int, int]:
    path = Path(run_dir) / STORE_NAME
    before = path.stat().st_size
    db = sqlite3.connect(path)
    with db:
        rows = db.execute("SELECT idx, errors FROM results WHERE errors IS NOT NULL").fetchall()
        db.executemany("UPDATE results SET errors = ? WHERE idx = ?",
                       [(errors_bytes(array_from_bytes(blob)), idx) for idx, blob in rows])
    db.execute("PRAGMA journal_mode=DELETE")  # fold the WAL in: one file in the repository
    db.execute("PRAGMA page_size=1024")  # rows of about 3 KB waste most of 4 KB pages
    db.execute("VACUUM")
    db.close()
    return before, path.stat().st_size


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        before, after = compact(Path(arg))
        print(f"{arg}: {before / 2**20:.2f} -> {after / 2**20:.2f} MiB")
