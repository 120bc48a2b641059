"""Which error makes a flow-matching model a good classifier? A class-conditional Fashion-MNIST rectified-flow
model and a DDPM control, the same network (class-tiny by default), data and CPU budget, scored on the same
test images.

    python -m benchmarks.flow --train-minutes 50 --images 2000      # trains both side by side, then scores

Training: what `diffusion-classifier train --conditioning class --objective {ddpm,flow}` runs, into
train-runs/flow-bench/fashion-mnist-{ddpm,flow}, the two in parallel on one torch thread each; re-running trains
on until each has --train-minutes of training in all (resumable). class-tiny rather than class-small because
scoring, not training, is the cost here: 2,000 images x 500 NFE x 2 runs is about 2 CPU-hours on class-tiny.
Scoring: one evaluation run (`run_evaluation`, as `diffusion-classifier evaluate`) per model, exhaustive over
the paper's even 50-point grid (stored in benchmarks/runs/, resumable), plus one with `--grid logit-normal` for
the flow model (on the first --logit-images of the test images). The other variants follow exactly from the
even-grid errors (tested in tests/test_schedules.py), so they cost no network evaluations:
  * velocity target: the flow model's eps error times 1 / (1 - sigma_t)^2 (L2);
  * ELBO weighting: each error times the schedule's -dlogSNR/dt weight (mean 1).
Rows at 10 / 25 / 50 timesteps (100 / 250 / 500 NFE) use even subsets of the grid; each variant's accuracy
comes with a paired standard error against the default (eps, even grid, uniform weights) on the same images.
Results go to benchmarks/results/flow.json and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import load_denoiser
from diffusion_classifier.adapters.schedules import even_subset
from diffusion_classifier.data import load_dataset
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.stats import paired_difference, standard_error
from diffusion_classifier.training.config import TrainConfig
from diffusion_classifier.training.trainer import train

from .common import RESULTS, test_subset
from .fashion_mnist import grid_run

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ("ddpm", "flow")


def train_both(args) -> dict:
    """Bring each model to --train-minutes of training (both in parallel); return their summaries."""
    workers = {}
    spawn = multiprocessing.get_context("spawn")
    for objective in OBJECTIVES:
        out = model_dir(args, objective)
        summary = out / "training_summary.json"
        done = json.loads(summary.read_text())["train_seconds"] / 60 if summary.is_file() else 0.0
        if done < args.train_minutes - min(0.5, 0.05 * args.train_minutes):  # a little slack: budgets overrun
            config = TrainConfig(conditioning="class", objective=objective, architecture=args.architecture,
                                 batch_size=64, lr=1.5e-3, warmup_steps=300, seed=0,
                                 max_minutes=args.train_minutes - done)
            print(f"train --data fashion-mnist --conditioning class --objective {objective} --architecture "
                  f"{args.architecture} --out {out} --batch-size 64 --lr 1.5e-3 --warmup-steps 300 --threads 1 "
                  f"--seed 0 --max-minutes {config.max_minutes:g}", flush=True)
            workers[objective] = spawn.Process(target=train_one, args=(config, str(out)))
            workers[objective].start()
    for objective, worker in workers.items():
        worker.join()
        if worker.exitcode != 0:
            raise SystemExit(f"training the {objective} model failed")
    return {o: json.loads((model_dir(args, o) / "training_summary.json").read_text()) for o in OBJECTIVES}


def train_one(config: TrainConfig, out: str) -> None:
    """One model on one torch thread (a worker process: the two train side by side)."""
    torch.set_num_threads(1)
    train(load_dataset("fashion-mnist", "train"), out, config, progress=False)


def model_dir(args, objective: str) -> Path:
    return Path(args.train_dir) / f"fashion-mnist-{objective}"


def accuracy(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per image, 1.0 where the lowest mean error is the true class. scores: [images, classes]."""
    return (scores.argmin(axis=1) == truth).astype(float)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-minutes", type=float, default=50.0, help="training budget per model, in all")
    parser.add_argument("--architecture", default="class-tiny", help="network preset of both models")
    parser.add_argument("--train-dir", default=str(ROOT / "train-runs" / "flow-bench"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--grid", type=int, default=50)
    parser.add_argument("--logit-images", type=int, default=500,
                        help="test images of the logit-normal-grid run (the first of the --images subset)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--runs-dir", default=str(ROOT / "benchmarks" / "runs"))
    parser.add_argument("--out", default=str(RESULTS / "flow.json"))
    args = parser.parse_args()
    tune_cpu_allocator()
    summaries = train_both(args)
    rows, baseline = [], {}
    for objective in OBJECTIVES:
        model = str(model_dir(args, objective))
        denoiser = load_denoiser(model)
        errors, grid, truth, _ = grid_run(denoiser, model, args.images, args)
        errors = np.stack([e[:, 0, :] for e in errors])  # [images, classes, grid]
        t = torch.tensor(grid)
        variants = {"eps, even grid": errors,
                    "ELBO weighting": errors * denoiser.schedule.elbo_weights()[t].numpy()}
        if objective == "flow":
            sigma = denoiser.schedule.sigmas[t].numpy()
            variants["velocity target"] = errors / (1 - sigma) ** 2
            logit, logit_grid, _, _ = grid_run(denoiser, model, args.logit_images, args, variant="logit-normal",
                                               extra={"grid": "logit-normal"})
            variants["logit-normal grid"] = np.stack([e[:, 0, :] for e in logit])
            grids = {"logit-normal grid": logit_grid}
            # the smaller run's images are the first of the same permutation; rows are in dataset-index order
            rows_of = {"logit-normal grid": np.isin(test_subset(args.images), test_subset(args.logit_images))}
        else:
            grids, rows_of = {}, {}
        for name, e in variants.items():
            g = grids.get(name, grid)
            order = np.argsort(g)
            for k in sorted({k for k in (10, 25) if k < args.grid} | {args.grid}):
                # even subsets of each grid (the logit-normal grid's subsets are its own quantile points only
                # at the full size; smaller rows there are strided subsets, marked as such)
                cols = order[even_subset(range(len(g)), k)]
                mask = rows_of.get(name, slice(None))
                correct = accuracy(e[:, :, cols].mean(axis=2), truth[mask])
                key = (objective, k)
                if name == "eps, even grid":
                    baseline[key] = correct
                diff, se = paired_difference(correct, baseline[key][mask])
                rows.append({"model": objective, "variant": name, "timesteps": k, "nfe": 10 * k,
                             "images": len(correct),
                             "accuracy": float(correct.mean()),
                             "accuracy_standard_error": standard_error(correct),
                             "paired_vs_default": diff, "paired_standard_error": se})
    for r in rows:
        if r["model"] == "flow" and r["variant"] == "eps, even grid":
            r["minus_ddpm_control"], r["minus_ddpm_control_standard_error"] = paired_difference(
                baseline[("flow", r["timesteps"])], baseline[("ddpm", r["timesteps"])])
    result = {"images": args.images, "architecture": args.architecture,
              "test_indices_rule": "np.sort(np.random.default_rng(0).permutation(10000)[:N])",
              "test_indices_first": test_subset(args.images)[:5].tolist(), "rows": rows,
              "training": {o: {k: s[k] for k in ("steps", "epochs", "train_seconds", "final_loss", "parameters")}
                           for o, s in summaries.items()}, "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_text(json.dumps(result, indent=2) + "\n", Path(args.out))
    print(f"{'model':<5} {'variant':<18} {'NFE':>4} {'accuracy':>16} {'paired vs default':>18}")
    for r in rows:
        print(f"{r['model']:<5} {r['variant']:<18} {r['nfe']:>4} {100 * r['accuracy']:>8.1f} +- "
              f"{100 * r['accuracy_standard_error']:.1f} {100 * r['paired_vs_default']:>+9.1f} +- "
              f"{100 * r['paired_standard_error']:.1f}")
    for r in rows:
        if "minus_ddpm_control" in r:
            print(f"flow minus ddpm control (eps, even grid) at {r['nfe']} NFE: "
                  f"{100 * r['minus_ddpm_control']:+.1f} +- "
                  f"{100 * r['minus_ddpm_control_standard_error']:.1f} (paired, same images)")


if __name__ == "__main__":
    main()
