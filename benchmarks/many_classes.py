"""Many candidates: strategies for 90-way classification, replayed on one stored exhaustive pass.

    python benchmarks/many_classes.py --sections pass --images 500 --minutes 150   # resumable
    python benchmarks/many_classes.py --sections strategies ten-way simulation

The task: Fashion-MNIST pair composites [a | b] (a != b, items from the test split, each item used once)
classified by the shipped fashion-mnist-pairs model among the 90 ordered-pair captions
"{a} to the left of {b}". The composites follow a balanced design: every block of 90 holds each ordered
pair once (blocks in random order), so any prefix of whole blocks is balanced over the classes. They are
written as a manifest under runs/many_classes/ (regenerated, not committed).

Sections:
  * pass: `evaluate` of the model with the 90 captions, exhaustive on the paper's 50-timestep grid, stored in
    benchmarks/runs/ (resumable: --minutes bounds one session, a later call goes on);
  * strategies: every strategy replayed on the stored errors (whatever the pass holds so far): accuracy,
    agreement with exhaustive-50, mean and 95th-percentile NFE, paired differences with standard errors;
    strategies fitted on held-out images (the first look) are cross-fitted over two halves;
  * ten-way: elimination before and after the t bound on the stored 2,000-image fashion-mnist-class run;
  * simulation: how often elimination drops the exhaustive winner on simulated errors, 2 to 1,000 candidates.
Writes results/many_classes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import RESULTS, RUNS, model_fingerprint, paired_difference  # benchmarks/

from diffusion_classifier import EvaluationRun, run_evaluation
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.pairs import compose, load_spec, pair_caption
from diffusion_classifier.replay import replay
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.schedules import even_subset
from diffusion_classifier.shortlists import fit_first_look
from diffusion_classifier.simulation import dropped_winner_rate
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.strategies import CoarseToFine, Elimination, Exhaustive, FixedTimesteps, Staged

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fashion-mnist-pairs"
TEMPLATE = "{left} to the left of {right}"
PAIRS = [(a, b) for a in range(10) for b in range(10) if a != b]  # class index -> (left item, right item)
GRID = 50


def captions(spec: dict | None = None) -> list[str]:
    names = (spec or load_spec())["names"]
    return [pair_caption(TEMPLATE, names[a], names[b]) for a, b in PAIRS]


def composites(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n balanced composites [n, 28, 56] and their class indices (into PAIRS); each test item used at most once."""
    images, labels = fashion_mnist_arrays("test")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(10)]
    classes = np.concatenate([rng.permutation(len(PAIRS)) for _ in range(-(-n // len(PAIRS)))])[:n]
    pictures = np.stack([compose(images[pools[PAIRS[k][0]].pop()], images[pools[PAIRS[k][1]].pop()])
                         for k in classes])
    return pictures, classes


def manifest_for(n: int) -> str:
    """The composites as PNGs plus manifest.jsonl (label: the class index); the path relative to the repository
    root, as the stored run names it."""
    from PIL import Image

    relative = Path("runs") / "many_classes" / f"pairs-test{n}" / "manifest.jsonl"
    path = ROOT / relative
    if not path.is_file():
        pictures, classes = composites(n)
        (path.parent / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (picture, k) in enumerate(zip(pictures, classes)):
            name = f"images/{i:05d}.png"
            Image.fromarray(picture).save(path.parent / name)
            lines.append(json.dumps({"path": name, "label": str(int(k))}))
        atomic_write_text("\n".join(lines) + "\n", path)
    return str(relative)


COARSE_GRID = 10  # the coarse pass's timesteps: an even 10-point grid, every point on the 50-point one


def coarse_captions(spec: dict | None = None) -> dict[str, dict[str, list[str]]]:
    """The partial captions "{item} on the {side}" (the pairs model's single-item captions) as two families of
    coarse candidates over the 90 captions: by left item and by right item."""
    spec = spec or load_spec()
    names, fine = spec["names"], captions(spec)
    return {side: {f"{names[item]} on the {side}": [fine[k] for k, pair in enumerate(PAIRS)
                                                     if pair[0 if side == "left" else 1] == item]
                   for item in range(10)} for side in ("left", "right")}


def coarse_errors(n_stored: int, args) -> np.ndarray:
    """[images, 20, 1, COARSE_GRID] errors of the partial captions on the first n_stored composites (the same noise
    as the pass: noise follows the image and the timestep). Cached in results/ (not committed), by chunks."""
    from diffusion_classifier import DiffusionClassifier, load_denoiser
    from diffusion_classifier.data import manifest
    from diffusion_classifier.schedules import as_schedule

    labels = [label for family in coarse_captions().values() for label in family]
    cache = RESULTS / "many_classes_coarse.npz"
    key = json.dumps({"weights": model_fingerprint(MODEL), "labels": labels, "grid": COARSE_GRID,
                      "data": pass_run(args.images).data})
    done = np.zeros((0, len(labels), 1, COARSE_GRID))
    if cache.exists() and str(np.load(cache)["key"]) == key:
        done = np.load(cache)["errors"]
    if len(done) >= n_stored:
        return done[:n_stored]
    dataset = manifest(ROOT / pass_run(args.images).data)
    grid = as_schedule(1000).grid(COARSE_GRID, 0)
    clf = DiffusionClassifier(load_denoiser(MODEL), labels=labels, templates=["{}"], strategy=FixedTimesteps(grid),
                              batch_size=args.batch_size)
    for start in range(len(done), n_stored, args.chunk):
        items = dataset.items[start:min(n_stored, start + args.chunk)]
        results = clf.classify(items)
        done = np.concatenate([done, np.stack([r.errors[:, :, np.argsort(r.timesteps)] for r in results])])
        np.savez(cache.with_suffix(".tmp.npz"), errors=done, key=key)
        cache.with_suffix(".tmp.npz").replace(cache)
        print(f"coarse pass: {len(done)} of {n_stored} images", flush=True)
    return done


def pass_run(n: int, batch_size: int = 64) -> EvaluationRun:
    out = RUNS / f"many-classes-pairs-{model_fingerprint(MODEL)[:10]}-test{n}-grid{GRID}"
    return EvaluationRun(model=MODEL, data=manifest_for(n), out=out.relative_to(ROOT), labels=tuple(captions()),
                         templates=("{}",), scoring={"strategy": Exhaustive(GRID), "batch_size": batch_size})


def section_pass(args) -> None:
    from diffusion_classifier.loading import load_denoiser

    run = pass_run(args.images, args.batch_size)
    denoiser = load_denoiser(MODEL)
    deadline = time.monotonic() + 60 * args.minutes
    print(f"evaluate --model {MODEL} --data {run.data} --labels-file <90 captions> --template '{{}}' "
          f"--timesteps {GRID} --out {run.out}", flush=True)
    while time.monotonic() < deadline:
        started = time.perf_counter()
        metrics = run_evaluation(run, denoiser=denoiser, progress=False, max_new=args.chunk)
        print(f"{metrics['images']} images stored, accuracy {metrics['accuracy']:.3f}, "
              f"{time.perf_counter() - started:.0f} s for the last {args.chunk}", flush=True)
        if metrics.get("complete"):
            break


def stored_pass(n: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The stored pass: errors [images, 90, 1, 50] in manifest order, true classes, and the grid."""
    run = pass_run(n)
    with ResultsStore(run.out) as store:
        rows = store.db.execute("SELECT idx, label FROM results WHERE status = 'ok' ORDER BY idx").fetchall()
        by_id = store.error_matrices_by_id()
        ids = dict(store.db.execute("SELECT idx, id FROM results WHERE status = 'ok'").fetchall())
    if not rows:
        raise SystemExit(f"no stored pass in {run.out}: run --sections pass first")
    errors = np.stack([by_id[ids[idx]][0] for idx, _ in rows])
    return errors, np.array([label for _, label in rows]), by_id[ids[rows[0][0]]][1]


def replayed(strategy, errors: np.ndarray, grid: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the replayed prediction and NFE."""
    tables = [replay(strategy, e, grid) for e in errors]
    return np.array([t.ranking()[0] for t in tables]), np.array([t.nfe for t in tables])


def as_grid(points: int) -> list[int]:
    from diffusion_classifier.schedules import as_schedule

    return as_schedule(1000).grid(points, 0)


def replayed_fine(strategy, errors: np.ndarray, grid: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """As replayed, for tables whose rows past the 90 classes are coarse candidates (never predicted); a coarse
    candidate asked for at a timestep the coarse pass did not score would read NaN, which is refused."""
    predictions, nfe = [], []
    for e in errors:
        table = replay(strategy, e, grid)
        if np.isnan(table.errors[table.evaluated]).any():
            raise SystemExit("a strategy asked for coarse errors the coarse pass did not score")
        order = [c for c in table.ranking() if c < len(PAIRS)]
        predictions.append(order[0])
        nfe.append(table.nfe)
    return np.array(predictions), np.array(nfe)


def cross_fitted(make_strategy, fit, errors: np.ndarray, grid: list[int]) -> tuple[np.ndarray, np.ndarray, list]:
    """A strategy fitted on held-out images, replayed on the others: fitted on the even-indexed images and
    replayed on the odd ones, then the other way round (every image predicted by a fit it took no part in)."""
    predictions, nfe, fits = np.zeros(len(errors), int), np.zeros(len(errors), int), []
    for held_out, scored in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        fitted = fit(errors[held_out])
        predictions[scored], nfe[scored] = replayed(make_strategy(fitted), errors[scored], grid)
        fits.append(fitted.to_dict())
    return predictions, nfe, fits


def section_strategies(args, out: dict) -> None:
    errors, labels, grid = stored_pass(args.images)
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    n = len(errors)
    print(f"{n} images stored; exhaustive-{GRID} accuracy {np.mean(exhaustive == labels):.3f}", flush=True)
    rate, miss = args.error_rate, args.miss_rate
    strategies = {f"exhaustive {k} (even subset)": FixedTimesteps(even_subset(grid, k)) for k in (5, 10, 20)}
    strategies[f"exhaustive {GRID}"] = Exhaustive(GRID)
    strategies["staged 5/50 keep 5/1 (the paper's fast variant, CIFAR-10/Pets shape)"] = Staged([5, GRID], [5, 1])
    strategies["staged 3/5/25/50 keep 45/5/1/1 (the paper's ImageNet shape, scaled)"] = Staged(
        [3, 5, 25, GRID], [45, 5, 1, 1])
    for r in (0.05, 0.2):
        strategies[f"elimination {r}, normal bound (before)"] = Elimination(r, max_timesteps=GRID, bound="normal")
        strategies[f"elimination {r}, t bound"] = Elimination(r, max_timesteps=GRID)
    strategies[f"elimination {rate}, top-10 shortlist after 8"] = Elimination(rate, max_timesteps=GRID, shortlist=10)
    rows = []

    def add(name, predictions, nfe, config, fits=None):
        correct, agree = predictions == labels, predictions == exhaustive
        difference, stderr = paired_difference(correct, exhaustive == labels)
        row = {"strategy": name, "config": config, "images": n, "accuracy": float(correct.mean()),
               "accuracy_standard_error": float(correct.std(ddof=1) / np.sqrt(n)),
               "accuracy_minus_exhaustive": difference, "difference_standard_error": stderr,
               "agreement": float(agree.mean()), "agreement_standard_error": float(agree.std(ddof=1) / np.sqrt(n)),
               "nfe_mean": float(nfe.mean()), "nfe_p95": float(np.percentile(nfe, 95))}
        if fits:
            row["fits"] = fits
        rows.append(row)
        print(f"{name:<66} acc {row['accuracy']:.3f} ({difference:+.3f} +- {stderr:.3f})  agree {row['agreement']:.3f}"
              f"  NFE {row['nfe_mean']:7.1f} (p95 {row['nfe_p95']:.0f})", flush=True)

    for name, strategy in strategies.items():
        add(name, *replayed(strategy, errors, grid), strategy.describe())
    for k in (1, 2, 3):
        def fit(held_out, k=k):
            return fit_first_look(held_out, grid, n_timesteps=k, miss_rate=miss)

        for cap in (None, 300):
            def make(first, cap=cap):
                return Elimination(rate - miss, max_timesteps=GRID, first_look=first, max_nfe=cap)

            name = f"first look {k} (miss {miss}) + elimination {rate - miss:g}" + (f", max_nfe {cap}" if cap else "")
            predictions, nfe, fits = cross_fitted(make, fit, errors, grid)
            add(name, predictions, nfe, {**make(None).describe(), "first_look": "cross-fitted"}, fits)
    if args.coarse:
        coarse = coarse_errors(n, args)
        families = coarse_captions()
        combined = np.full((n, len(PAIRS) + coarse.shape[1], 1, GRID), np.nan)
        combined[:, :len(PAIRS)] = errors
        columns = [grid.index(t) for t in as_grid(COARSE_GRID)]
        combined[:, len(PAIRS):, :, columns] = coarse
        labels_all = captions() + [label for family in families.values() for label in family]
        for keep in (2, 3):
            for k in (2, 3):
                strategy = CoarseToFine(list(families.values()), keep=keep, timesteps=k, grid=COARSE_GRID,
                                        then=Elimination(rate, max_timesteps=GRID)).resolve(labels_all)
                name = (f"coarse-to-fine: partial captions at {k} timesteps, keep {keep} per side, then elimination "
                        f"{rate}")
                add(name, *replayed_fine(strategy, combined, grid), strategy.describe())
    out["strategies"] = rows
    out["meta"] = {"images": n, "grid": GRID, "classes": len(PAIRS), "model": MODEL,
                   "weights": model_fingerprint(MODEL), "exhaustive_accuracy": float(np.mean(exhaustive == labels)),
                   "error_rate": rate, "miss_rate": miss}


def section_ten_way(args, out: dict) -> None:
    """Elimination before (normal bound) and after (t bound) on 10 classes: the stored exhaustive run of
    fashion-mnist-class (its earlier weights) on 2,000 test images, 50-timestep grid, replayed."""
    runs = sorted(RUNS.glob(f"fashion-mnist-class-*-test2000-grid{GRID}"))
    if not runs:
        print("10-way: no stored fashion-mnist-class grid run in benchmarks/runs; skipped")
        return
    with ResultsStore(runs[-1]) as store:
        rows = store.db.execute("SELECT id, label FROM results WHERE status = 'ok' ORDER BY idx").fetchall()
        by_id = store.error_matrices_by_id()
    errors, grid = np.stack([by_id[i][0] for i, _ in rows]), by_id[rows[0][0]][1]
    labels = np.array([y for _, y in rows])
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    table = []
    for rate in (0.01, 0.05, 0.2):
        for bound in ("normal", "t"):
            predictions, nfe = replayed(Elimination(rate, max_timesteps=GRID, bound=bound), errors, grid)
            correct = predictions == labels
            row = {"strategy": f"elimination {rate}, {bound} bound", "images": len(errors), "run": runs[-1].name,
                   "accuracy": float(correct.mean()), "accuracy_standard_error": float(correct.std(ddof=1) /
                                                                                       np.sqrt(len(errors))),
                   "agreement": float(np.mean(predictions == exhaustive)), "nfe_mean": float(nfe.mean()),
                   "nfe_p95": float(np.percentile(nfe, 95))}
            table.append(row)
            print(f"10-way {row['strategy']:<28} acc {row['accuracy']:.4f} agree {row['agreement']:.4f} "
                  f"NFE {row['nfe_mean']:.1f} (p95 {row['nfe_p95']:.0f})", flush=True)
    out["ten_way"] = table


def section_simulation(args, out: dict) -> None:
    """How often elimination drops the exhaustive winner on simulated errors (simulation.py: heavy-tailed paired
    gaps peaking at mid-range timesteps, candidates tied in expectation with the best), 2 to 1,000 candidates,
    both bounds, a first round of 3 or 8 timesteps."""
    rows = []
    for n_candidates, n_tied, repeats in ((2, 2, 2000), (10, 4, 1000), (90, 30, 400), (1000, 100, 100)):
        for min_timesteps, round_size in ((3, 1), (8, 4)):
            for bound in ("normal", "t"):
                strategy = Elimination(0.05, max_timesteps=50, min_timesteps=min_timesteps, round_size=round_size,
                                       bound=bound)
                rate, cost = dropped_winner_rate(strategy, n_candidates, n_tied, repeats, seed=n_candidates)
                row = {"candidates": n_candidates, "tied": n_tied, "min_timesteps": min_timesteps, "bound": bound,
                       "repeats": repeats, "error_rate": 0.05, "dropped_winner": rate,
                       "standard_error": float(np.sqrt(max(rate * (1 - rate), 1e-12) / repeats)),
                       "nfe_share_of_exhaustive": cost}
                rows.append(row)
                print(f"simulation {n_candidates:>4} candidates, first {min_timesteps}, {bound:<6}: dropped the winner "
                      f"{rate:.3f} +- {row['standard_error']:.3f}, NFE {cost:.2f} of exhaustive", flush=True)
    out["simulation"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["pass", "strategies", "ten-way", "simulation"],
                        choices=["pass", "strategies", "ten-way", "simulation"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=600.0, help="time budget of the pass in this call")
    parser.add_argument("--chunk", type=int, default=30, help="images per commit of the pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--error-rate", type=float, default=0.05, help="the promise of the first-look rows (total)")
    parser.add_argument("--miss-rate", type=float, default=0.02, help="the first look's share of it")
    parser.add_argument("--coarse", action="store_true", help="strategies: add the coarse-to-fine rows (scores the "
                        "20 partial captions at 10 timesteps of the stored images first, cached)")
    args = parser.parse_args()
    os.chdir(ROOT)  # the stored run names its data relative to the repository root
    tune_cpu_allocator()
    RESULTS.mkdir(exist_ok=True)
    if "pass" in args.sections:
        section_pass(args)
    path = RESULTS / "many_classes.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for name, section in (("strategies", section_strategies), ("ten-way", section_ten_way),
                          ("simulation", section_simulation)):
        if name in args.sections:
            section(args, out)
            atomic_write_text(json.dumps(out, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
