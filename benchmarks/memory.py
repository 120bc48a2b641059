"""Peak memory of an `evaluate` run at 1k vs 10k images: the runner must not grow with the run.

    python -m benchmarks.memory                # 1,000 and 10,000 Fashion-MNIST test images
    python -m benchmarks.memory --sizes 200 2000

Each size runs one evaluation run (`run_evaluation`, what `diffusion-classifier evaluate` calls) in a
fresh process (built-in class-conditional model, one timestep per class so the run is cheap) and samples
the process's resident set size every 50 ms with psutil. Prints a table and writes
benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a command, sampled every 50 ms."""
    started = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return peak / 2**20, time.perf_counter() - started


def evaluate_once(model: str, n: int, out: str) -> None:
    from diffusion_classifier import EvaluationRun, Exhaustive, run_evaluation

    run_evaluation(EvaluationRun(model=model, data="fashion-mnist", limit=n, out=out, device="cpu",
                                 scoring={"strategy": Exhaustive(1), "batch_size": 500, "images_per_batch": 64}),
                   progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--model", default="fashion-mnist-class")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # the measured process: one run of N images
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        evaluate_once(args.model, args.child, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", str(n), "--model", args.model,
                   "--out", str(Path(tmp) / f"run{n}")]
            peak, seconds = peak_rss_of(cmd)
            store = (Path(tmp) / f"run{n}" / "results.sqlite").stat().st_size / 2**20
            rows.append({"images": n, "peak_rss_mib": round(peak, 1), "seconds": round(seconds, 1),
                         "store_mib": round(store, 2)})
            print(f"{n:>7} images: peak RSS {peak:8.1f} MiB   {seconds:7.1f} s   store {store:6.2f} MiB", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"model": args.model, "rows": rows,
           "growth_mib": round(rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"], 1)}
    (RESULTS / "memory.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"peak RSS growth from {rows[0]['images']} to {rows[-1]['images']} images: {out['growth_mib']} MiB")


if __name__ == "__main__":
    main()
