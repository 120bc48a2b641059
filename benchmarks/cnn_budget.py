"""An honest discriminative baseline: the small CNN reference trained for the same CPU budget as a diffusion
model it is compared with, without and with the standard augmentation, scored on the same test images.

    python -m benchmarks.cnn_budget --minutes 50            # both CNNs side by side, one torch thread each

The budget is wall time on one torch thread, as the diffusion models were trained (the flow benchmark's
DDPM control: 50 minutes of class-tiny; the shipped fashion-mnist-class: 274 minutes of class-small).
Augmentation: random horizontal flips and random shifts of up to 2 pixels (edge-replicated), per image.
Each run checkpoints every 5 minutes into train-runs/cnn-budget/{none,flips+shifts}/ and resumes from there
(a rerun with a larger --minutes extends it); the test accuracy at each checkpoint is kept, which gives a
learning curve for free. Paired differences (same images) against
every stored 2,000-image evaluate run of a diffusion model found in benchmarks/runs/ (the shipped models'
runs are in the repository; the flow benchmark's DDPM control appears once benchmarks/flow.py has run).
Results go to benchmarks/results/cnn_budget.json and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.runtime import atomic_torch_save, atomic_write_text
from diffusion_classifier.stats import paired_difference, standard_error
from diffusion_classifier.store import ResultsStore

from .common import RESULTS, RUNS, CNNTrainer, child_process, test_subset, to_pixels

ROOT = Path(__file__).resolve().parents[1]
AUGMENTATIONS = ("none", "flips+shifts")
CHECKPOINT_MINUTES = 5.0


def train(minutes: float, augmentation: str, out: Path, pixels: torch.Tensor, labels: np.ndarray,
          seed: int = 0) -> dict:
    """Train (resuming from out/checkpoint.pt) until `minutes` of training in all, checkpointing every
    CHECKPOINT_MINUTES with a point of the accuracy curve; return the run's summary."""
    torch.set_num_threads(1)
    images, train_labels = fashion_mnist_arrays("train")
    trainer = CNNTrainer(to_pixels(images), torch.from_numpy(train_labels), augmentation != "none", seed=seed)
    curve = []
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        trainer.load_state_dict(saved["trainer"])
        curve = saved["curve"]
    while trainer.seconds < minutes * 60:
        stop = min(minutes * 60, (trainer.seconds // (CHECKPOINT_MINUTES * 60) + 1) * CHECKPOINT_MINUTES * 60)
        trainer.train_for(stop - trainer.seconds)
        curve.append({"minutes": round(trainer.seconds / 60, 2), "steps": trainer.steps,
                      "accuracy": float(trainer.correct(pixels, labels).mean())})
        atomic_torch_save({"trainer": trainer.state_dict(), "curve": curve}, checkpoint)
    correct = trainer.correct(pixels, labels)
    return {"minutes": minutes, "augmentation": augmentation, "steps": trainer.steps, "epochs": trainer.epochs,
            "images": len(correct), "accuracy": float(correct.mean()), "accuracy_standard_error":
            standard_error(correct), "curve": curve, "correct": correct}


def diffusion_runs(subset: np.ndarray, runs_dir: Path) -> dict[str, np.ndarray]:
    """{run name: per-image correctness} of the complete exhaustive runs over exactly these test images."""
    ids = [f"test/{i}" for i in subset]
    found = {}
    for run in sorted(runs_dir.glob(f"fashion-mnist-*-test{len(subset)}-grid*")):
        if "variant" in run.name or not (run / "results.sqlite").is_file():
            continue
        store = ResultsStore(run)
        try:
            records = {r["id"]: r for r in store.records() if r["status"] == "ok"}
        finally:
            store.close()
        if all(i in records for i in ids):
            found[run.name] = np.array([records[i]["correct"] for i in ids], dtype=float)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=50.0, help="training budget of each CNN, in all")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--train-dir", default=str(ROOT / "train-runs" / "cnn-budget"))
    parser.add_argument("--runs-dir", default=str(RUNS))
    parser.add_argument("--out", default=str(RESULTS / "cnn_budget.json"))
    parser.add_argument("--worker", choices=AUGMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    subset = test_subset(args.images)
    images, labels = fashion_mnist_arrays("test")
    pixels, labels = to_pixels(images[subset]), labels[subset]
    train_dir = Path(args.train_dir)
    if args.worker:  # one CNN, in its own process so the two train side by side on one thread each
        out = train_dir / args.worker  # a later, larger --minutes resumes and extends the run
        out.mkdir(parents=True, exist_ok=True)
        summary = train(args.minutes, args.worker, out, pixels, labels)
        summary["correct"] = "".join("1" if c else "0" for c in summary["correct"])
        atomic_write_text(json.dumps(summary) + "\n", out / "summary.json")
        return
    workers = [subprocess.Popen(**child_process(__spec__.name, "--worker", a, "--minutes", str(args.minutes),
                                                "--images", str(args.images), "--train-dir", str(train_dir)))
               for a in AUGMENTATIONS]
    if any(w.wait() != 0 for w in workers):
        raise SystemExit("a CNN training run failed")
    references = diffusion_runs(subset, Path(args.runs_dir))
    rows = []
    for a in AUGMENTATIONS:
        summary = json.loads((train_dir / a / "summary.json").read_text())
        correct = np.array([c == "1" for c in summary.pop("correct")], dtype=float)
        summary["paired_vs_diffusion"] = {}
        for name, other in references.items():
            difference, stderr = paired_difference(correct, other)
            summary["paired_vs_diffusion"][name] = {"difference": difference, "standard_error": stderr,
                                                    "diffusion_accuracy": float(other.mean())}
        rows.append(summary)
    result = {"images": args.images, "test_indices_rule": "np.sort(np.random.default_rng(0).permutation(10000)[:N])",
              "threads": 1, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_text(json.dumps(result, indent=2) + "\n", Path(args.out))
    for r in rows:
        print(f"CNN {r['minutes']:g} min, augmentation {r['augmentation']}: {100 * r['accuracy']:.1f}% +- "
              f"{100 * r['accuracy_standard_error']:.1f} ({r['epochs']:.1f} epochs; curve "
              + ", ".join(f"{c['minutes']:.0f} min {100 * c['accuracy']:.1f}" for c in r["curve"]) + ")")
        for name, p in r["paired_vs_diffusion"].items():
            print(f"    minus {name} ({100 * p['diffusion_accuracy']:.1f}%): {100 * p['difference']:+.1f} +- "
                  f"{100 * p['standard_error']:.1f}")


if __name__ == "__main__":
    main()
