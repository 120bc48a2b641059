"""A first look at a lower resolution for a latent model, measured.

Two exhaustive evaluate runs of the same labelled images (stored, resumable): at the model's own resolution
and at --low pixels. A first look of K timesteps is fitted on the low run against the full run's winners
(cross-fitted: fitted on every other image, replayed on the rest, then the other way round), and elimination at
full resolution goes on among its shortlist, replayed on the full run; beside it the same first look fitted
and run at full resolution, and exhaustive scoring. Cost is counted in full-resolution evaluations: a low one
weighs the ratio of the two runs' measured seconds per evaluation.

Needs a latent model whose network takes any size (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux) and an image
folder; at the paper's scale a GPU. `--tiny` runs it end to end on the CPU with a random-weight tiny SD
pipeline and random images (the mechanics only: its accuracies mean nothing).

    python -m benchmarks.low_resolution_look --model stabilityai/stable-diffusion-2-base --data DIR \\
        --low 256 --timesteps 50 --images 500
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from diffusion_classifier import EvaluationRun, run_evaluation
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.shortlists import fit_first_look, per_timestep
from diffusion_classifier.engine.strategies import Elimination, Exhaustive, FixedTimesteps
from diffusion_classifier.runtime import atomic_write_text
from diffusion_classifier.stats import paired_difference, standard_error
from diffusion_classifier.store import read_run
from diffusion_classifier.tasks import task_of

from .common import RESULTS, RUNS


def stored(run: EvaluationRun) -> tuple[np.ndarray, list[int], list[str], np.ndarray, float]:
    """(errors [images, classes, prompts, grid], grid, image ids, labels, seconds per evaluation) of a run."""
    config, rows = read_run(run.out)
    errors, grid = task_of(config).error_grids(config, rows)
    ok = [r for r in rows if r.ok]
    seconds = sum(r.seconds for r in ok) / sum(r.nfe for r in ok)
    return errors, grid, [r.id for r in ok], np.array([r.label for r in ok]), seconds


def look_rows(errors, low_errors, grid, labels, k: int, args, cost_ratio: float) -> list[dict]:
    """The first look of k timesteps at full and at low resolution, each then elimination at full resolution."""
    images, classes = errors.shape[:2]
    exhaustive = per_timestep(errors).mean(axis=2).argmin(axis=1)
    rows = []
    for name, look_errors, resolution in (("full resolution", errors, None), (f"{args.low} px", low_errors, args.low)):
        predictions, nfe_full, nfe_low = np.zeros(images, int), np.zeros(images), np.zeros(images)
        for held_out, scored in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
            look = fit_first_look(look_errors[held_out], grid, k, args.miss_rate, winners=exhaustive[held_out],
                                  resolution=resolution)
            strategy = Elimination(args.error_rate - args.miss_rate, max_timesteps=len(grid), first_look=look)
            for i in np.arange(images)[scored]:
                shortlist = None
                if resolution is not None:  # the look's own code, on the low run's errors
                    table = replay(FixedTimesteps(look.timesteps), look_errors[i], grid)
                    shortlist, nfe_low[i] = look.shortlist(table, list(range(classes))), table.nfe
                table = replay(strategy, errors[i], grid, candidates=shortlist)
                predictions[i], nfe_full[i] = table.ranking()[0], table.nfe
        correct = predictions == labels
        difference, stderr = paired_difference(correct, exhaustive == labels)
        cost = nfe_full + cost_ratio * nfe_low
        rows.append({"strategy": f"first look {k} at {name} (miss {args.miss_rate}) + elimination "
                                 f"{args.error_rate - args.miss_rate:g}", "images": images,
                     "accuracy": float(correct.mean()), "accuracy_standard_error": standard_error(correct),
                     "accuracy_minus_exhaustive": difference, "difference_standard_error": stderr,
                     "agreement": float((predictions == exhaustive).mean()), "nfe_full_mean": float(nfe_full.mean()),
                     "nfe_low_mean": float(nfe_low.mean()), "cost_mean": float(cost.mean()),
                     "cost_p95": float(np.percentile(cost, 95))})
    return rows


def tiny_setup(root: Path) -> tuple[str, str]:
    from .tiny_pipelines import build_stable_diffusion, image_folder

    model = build_stable_diffusion(root / "sd")
    data = image_folder(root / "data", ["dog", "cat", "bird", "fish", "frog", "horse"], 4, size=16, mode="RGB")
    return str(model), str(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a latent model (hub id or directory)")
    parser.add_argument("--data", help="an image folder (one subfolder per class)")
    parser.add_argument("--labels", help="comma-separated class names (default: the folder names)")
    parser.add_argument("--preset", help="a dataset preset: its class names and prompts")
    parser.add_argument("--low", type=int, default=256, help="the first look's resolution in pixels")
    parser.add_argument("--timesteps", type=int, default=50, help="the exhaustive grid")
    parser.add_argument("--images", type=int, default=500, help="images scored (the first of the folder's order)")
    parser.add_argument("--look-timesteps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--miss-rate", type=float, default=0.02, help="the first look's share of the promise")
    parser.add_argument("--error-rate", type=float, default=0.05, help="the promise in total")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="low_resolution_look", help="results/OUT.json")
    parser.add_argument("--json", help="write the results here instead (--tiny writes none unless given this)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD pipeline on the CPU (mechanics only)")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory() if args.tiny else None
    if args.tiny:
        args.model, args.data = tiny_setup(Path(scratch.name))
        args.low, args.timesteps, args.images, args.miss_rate, args.error_rate = 8, 8, 24, 0.25, 0.3
        args.look_timesteps = [1, 2]
    if not args.model or not args.data:
        raise SystemExit("give --model and --data (or --tiny)")
    runs = Path(scratch.name) / "runs" if args.tiny else RUNS
    name = Path(args.model).name.replace("/", "-")
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    evaluated = []
    for resolution in (None, args.low):
        run = EvaluationRun(model=args.model, data=args.data, limit=args.images, preset=args.preset,
                            labels=args.labels.split(",") if args.labels else None,
                            out=runs / f"low-resolution-look-{name}-{resolution or 'native'}-grid{args.timesteps}",
                            scoring={"strategy": Exhaustive(args.timesteps), "batch_size": batch},
                            device=args.device, dtype=args.dtype, resolution=resolution)
        metrics = run_evaluation(run, progress=not args.tiny)
        print(f"exhaustive {args.timesteps} at {resolution or 'its own'} px: {metrics['images']} images, accuracy "
              f"{metrics['accuracy']:.3f}", flush=True)
        evaluated.append(stored(run))
    (errors, grid, ids, labels, seconds), (low_errors, low_grid, low_ids, _, low_seconds) = evaluated
    if ids != low_ids or grid != low_grid:
        raise SystemExit("the two runs do not hold the same images on the same grid")
    exhaustive = per_timestep(errors).mean(axis=2).argmin(axis=1)
    cost_ratio = low_seconds / seconds
    rows = [{"strategy": f"exhaustive {args.timesteps}", "images": len(errors),
             "accuracy": float(np.mean(exhaustive == labels)),
             "accuracy_standard_error": standard_error(exhaustive == labels), "accuracy_minus_exhaustive": 0.0,
             "difference_standard_error": 0.0, "agreement": 1.0, "nfe_full_mean": float(errors.shape[1] * len(grid)),
             "nfe_low_mean": 0.0, "cost_mean": float(errors.shape[1] * len(grid)),
             "cost_p95": float(errors.shape[1] * len(grid))}]
    for k in args.look_timesteps:
        rows += look_rows(errors, low_errors, grid, labels, k, args, cost_ratio)
    print(f"\na low-resolution evaluation costs {cost_ratio:.2f} of a full one (measured seconds per evaluation)")
    print("| strategy | accuracy | vs exhaustive (paired) | agrees | NFE full + low | cost (full NFE) mean, p95 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {100 * r['accuracy']:.1f}% +- {100 * r['accuracy_standard_error']:.1f} | "
              f"{100 * r['accuracy_minus_exhaustive']:+.1f} +- {100 * r['difference_standard_error']:.1f} | "
              f"{100 * r['agreement']:.1f}% | {r['nfe_full_mean']:.0f} + {r['nfe_low_mean']:.0f} | "
              f"{r['cost_mean']:.0f}, {r['cost_p95']:.0f} |")
    path = Path(args.json) if args.json else None if args.tiny else RESULTS / f"{args.out}.json"
    if path is not None:
        out = {"meta": {"model": args.model, "data": args.data, "low": args.low, "grid": args.timesteps,
                        "images": len(errors), "classes": errors.shape[1], "cost_ratio": cost_ratio}, "rows": rows}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json.dumps(out, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
