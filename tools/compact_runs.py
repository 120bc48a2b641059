"""Compact stored runs for the repository (ResultsStore.compact: float32 error matrices where lossless, the WAL
folded in, small pages): the same results in about half the bytes.

    python tools/compact_runs.py benchmarks/runs/*/
"""

import sys
from pathlib import Path

from diffusion_classifier.store import STORE_NAME, ResultsStore


def compact(run_dir: Path) -> tuple[int, int]:
    path = Path(run_dir) / STORE_NAME
    before = path.stat().st_size
    with ResultsStore(run_dir) as store:
        store.compact()
    return before, path.stat().st_size


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        before, after = compact(Path(arg))
        print(f"{arg}: {before / 2**20:.2f} -> {after / 2**20:.2f} MiB")
