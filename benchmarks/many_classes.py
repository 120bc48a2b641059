"""Many candidates: strategies for 90-way classification, replayed on one stored exhaustive pass.

    python -m benchmarks.many_classes --sections pass --images 500 --minutes 150   # resumable
    python -m benchmarks.many_classes --sections strategies ten-way simulation
    python -m benchmarks.many_classes --sections states && bash tools/gpu_run_many_classes.sh   # on a GPU lease

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
  * simulation: how often elimination drops the exhaustive winner on simulated errors, 2 to 1,000 candidates;
  * states: the text encoder's token states of the 90 captions and the 20 partial ones, written to --states,
    so that a machine without the encoder (the GPU machine: 88 MB cannot travel) scores the pairs model from
    them (`--states` with pass, strategies --coarse);
  * thousand: the 1,000-way task (section_thousand); with --learned-coarse, a `learn-coarse` extension of the
    triples model whose learned families get cascade rows of their own:
        python -m diffusion_classifier learn-coarse --model train-runs/triples16 --families positions.json \
            --data fashion-mnist --layout triples --out train-runs/triples16-positions --minutes 15
        python -m benchmarks.many_classes --sections thousand --triples-model train-runs/triples16 \
            --thousand-images 900 --learned-coarse train-runs/triples16-positions --batch-size 2048 --chunk 120
    (positions.json: training.triples.position_families of the model's class names, written as JSON.)
With --store-only the passes and coarse caches are scored and nothing is replayed (a GPU lease's share).
Writes results/many_classes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from diffusion_classifier import EvaluationRun, run_evaluation
from diffusion_classifier.adapters.schedules import even_subset
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.shortlists import fit_cascade, fit_first_look
from diffusion_classifier.engine.simulation import dropped_winner_rate
from diffusion_classifier.engine.strategies import (
    Cascade,
    CoarseToFine,
    Elimination,
    Exhaustive,
    FixedTimesteps,
    Staged,
)
from diffusion_classifier.errors import UserError
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.stats import paired_difference, standard_error
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.training.pairs import compose, load_spec, pair_caption

from .common import RESULTS, RUNS, model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fashion-mnist-pairs"
TEMPLATE = "{left} to the left of {right}"
PAIRS = [(a, b) for a in range(10) for b in range(10) if a != b]  # class index -> (left item, right item)
GRID = 50
# cascades: (first stage's timesteps, or options for it chosen on held-out images; miss rate; calibration; and
# optionally the folds of the cross-fitting and how many random fold assignments to average over)
CASCADES = ((1, 0.05, "union"), (1, 0.05, "joint"), (2, 0.05, "joint"), (1, 0.1, "union"), (1, 0.1, "joint"),
            (1, 0.05, "joint", 2, 5), (1, 0.05, "joint", 6, 3))
CALIBRATIONS = {"joint": "joint", "union": "union bound"}
LEVEL_OPTIONS = (1, 2, 3, 4, 6)  # a coarse level's timesteps, chosen on held-out images


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
    from diffusion_classifier.data import manifest

    labels = [label for family in coarse_captions().values() for label in family]
    dataset = manifest(ROOT / pass_run(args.images).data)
    return cached_errors("many_classes_coarse.npz", MODEL, lambda: pairs_denoiser(args), labels, ["{}"], dataset,
                         n_stored, as_grid(COARSE_GRID), args)


def pairs_denoiser(args):
    """The shipped pairs model at --device / --dtype; with --states, its captions' token states read from that
    file (`--sections states`) instead of running the text encoder."""
    import torch

    from diffusion_classifier.adapters.loading import builtin_model_dir, load_denoiser
    from diffusion_classifier.runtime import parse_device, parse_dtype

    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype, device)
    if not args.states:
        return load_denoiser(MODEL, device=device, dtype=dtype)
    from .gpu_pairs import packed_denoiser

    with np.load(args.states) as stored:
        if str(stored["weights"]) != model_fingerprint(MODEL):
            raise SystemExit(f"{args.states} holds the token states of other weights: write it again "
                             "(--sections states)")
        packed = ({"captions": stored["captions"].tolist()}, torch.from_numpy(stored["states"]),
                  torch.from_numpy(stored["mask"]))
    return packed_denoiser(builtin_model_dir(MODEL), packed, device, dtype)


def section_states(args) -> None:
    """The token states of every caption the pairs model scores here (the 90 and the 20 partial ones), float32."""
    import io

    from diffusion_classifier.adapters.loading import load_denoiser
    from diffusion_classifier.runtime import atomic_write_bytes

    if not args.states:
        raise SystemExit("--sections states needs --states FILE")
    texts = captions() + [label for family in coarse_captions().values() for label in family]
    condition = load_denoiser(MODEL, device="cpu", dtype="float32").embed_conditions(texts)
    mask = condition["encoder_attention_mask"]
    # padding positions are masked out of the cross-attention (their values never count): zeros, which compress
    states = condition["encoder_hidden_states"].float() * mask.bool()[..., None]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, captions=np.array(texts), states=states.numpy(),
                        mask=mask.numpy(), weights=np.array(model_fingerprint(MODEL)))
    atomic_write_bytes(buffer.getvalue(), Path(args.states))
    print(f"{args.states}: token states of {len(texts)} captions", flush=True)


def cached_errors(name: str, model, make_denoiser, labels: list[str], templates, dataset, n_stored: int,
                  timesteps: list[int], args) -> np.ndarray:
    """[images, labels, prompts, timesteps] errors of `labels` on the first n_stored images of `dataset`, scored at
    `timesteps` by make_denoiser() (`model`'s), cached in results/NAME (not committed) and extended chunk by
    chunk."""
    from diffusion_classifier import DiffusionClassifier

    cache = RESULTS / name
    key = json.dumps({"weights": model_fingerprint(model), "labels": labels, "timesteps": timesteps,
                      "images": [str(i) for i in dataset.items[:1]]})
    done = None
    if cache.exists() and str(np.load(cache)["key"]) == key:
        done = np.load(cache)["errors"]
    if done is not None and len(done) >= n_stored:
        return done[:n_stored]
    clf = DiffusionClassifier(make_denoiser(), labels=labels, templates=templates,
                              strategy=FixedTimesteps(timesteps), batch_size=args.batch_size)
    start = 0 if done is None else len(done)
    for first in range(start, n_stored, args.chunk):
        results = clf.classify(dataset.items[first:min(n_stored, first + args.chunk)])
        chunk = np.stack([r.errors[:, :, np.argsort(r.timesteps)] for r in results])
        done = chunk if done is None else np.concatenate([done, chunk])
        np.savez(cache.with_suffix(".tmp.npz"), errors=done, key=key)
        cache.with_suffix(".tmp.npz").replace(cache)
        print(f"{name}: {len(done)} of {n_stored} images", flush=True)
    return done


def pass_run(n: int, batch_size: int = 64) -> EvaluationRun:
    out = RUNS / f"many-classes-{MODEL}-{model_fingerprint(MODEL)[:10]}-test{n}-grid{GRID}"
    return EvaluationRun(model=MODEL, data=manifest_for(n), out=out.relative_to(ROOT), labels=tuple(captions()),
                         templates=("{}",), scoring={"strategy": Exhaustive(GRID), "batch_size": batch_size})


def section_pass(args) -> None:
    run = pass_run(args.images, args.batch_size)
    denoiser = pairs_denoiser(args)
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
    if args.coarse:
        with ResultsStore(run.out) as store:
            coarse_errors(len(store.rows(ok_only=True)), args)


def stored_pass(n: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The stored pass: errors [images, 90, 1, 50] in manifest order, true classes, and the grid."""
    run = pass_run(n)
    if not (ROOT / run.out / "results.sqlite").is_file():
        raise SystemExit(f"no stored pass in {run.out}: run --sections pass first")
    errors, labels, grid = stored_grid(run.out)
    if not len(labels):
        raise SystemExit(f"the pass in {run.out} holds no images yet")
    return errors, labels, grid


def stored_grid(run_dir) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """An exhaustive run's errors [images, classes, prompts, grid] in item order, true classes, and the grid."""
    with ResultsStore(run_dir) as store:
        rows = store.rows(ok_only=True)
    if not rows:
        return np.zeros((0,)), np.zeros(0, dtype=int), []
    return np.stack([r.error_matrix() for r in rows]), np.array([r.label for r in rows]), rows[0].timestep_list()


def replayed(strategy, errors: np.ndarray, grid: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the replayed prediction and NFE."""
    tables = [replay(strategy, e, grid) for e in errors]
    return np.array([t.ranking()[0] for t in tables]), np.array([t.nfe for t in tables])


def as_grid(points: int) -> list[int]:
    from diffusion_classifier.adapters.schedules import as_schedule

    return as_schedule(1000).grid(points, 0)


def replayed_fine(strategy, errors: np.ndarray, grid: list[int], n_classes: int,
                  coarse_rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """As replayed, for tables whose rows past the classes are coarse candidates (never predicted); a coarse
    candidate asked for at a timestep the coarse pass did not score would read NaN, which is refused.
    `coarse_rows`: the coarse rows the strategy scores (default every row past the classes): the others are left
    out, as a classifier holds only its strategy's coarse candidates (a cascade takes any other row for a class)."""
    candidates = None if coarse_rows is None else list(range(n_classes)) + list(coarse_rows)
    predictions, nfe = [], []
    for e in errors:
        table = replay(strategy, e, grid, candidates=candidates)
        if np.isnan(table.errors[table.evaluated]).any():
            raise SystemExit("a strategy asked for coarse errors the coarse pass did not score")
        predictions.append(next(c for c in table.ranking() if c < n_classes))
        nfe.append(table.nfe)
    return np.array(predictions), np.array(nfe)


def cross_fitted(make_strategy, fit, errors: np.ndarray, grid: list[int], folds: int = 2,
                 repeats: int = 1) -> tuple[np.ndarray, np.ndarray, list]:
    """A strategy fitted on held-out images, replayed on the others, every image predicted by a fit it took no part
    in: by default fitted on the even-indexed images and replayed on the odd ones, then the other way round; else
    over `folds` folds, for `repeats` random fold assignments (fold_assignments). Predictions and NFE per image,
    [repeats, images] when repeated; the fits of the first assignment's first two folds."""
    n = len(errors)
    predictions, nfe, fits = np.zeros((repeats, n), int), np.zeros((repeats, n), int), []
    for repeat, parts in enumerate(fold_assignments(n, folds, repeats)):
        for scored in parts:
            fitted = fit(errors[np.setdiff1d(np.arange(n), scored)])
            predictions[repeat, scored], nfe[repeat, scored] = replayed(make_strategy(fitted), errors[scored], grid)
            if repeat == 0 and len(fits) < 2:  # the first two folds' fits are kept (the file stays small)
                fits.append(fitted.describe() if isinstance(fitted, Cascade) else fitted.to_dict())
    return (predictions[0], nfe[0], fits) if repeats == 1 else (predictions, nfe, fits)


def fold_assignments(n: int, folds: int, repeats: int) -> list[list[np.ndarray]]:
    """Per repeat, the images each fold scores: the odd-indexed, then the even-indexed ones for one repeat of two
    folds (each half fitted on the other), else a random assignment per repeat (seeds 0, 1, ...)."""
    if folds == 2 and repeats == 1:
        return [[np.arange(1, n, 2), np.arange(0, n, 2)]]
    assignments = []
    for seed in range(repeats):
        order = np.random.default_rng(seed).permutation(n)
        assignments.append([np.sort(order[f::folds]) for f in range(folds)])
    return assignments


def fitted_how(folds: int | str, repeats: int) -> str:
    if folds == "fresh":
        return (f"fitted on composites 0-{FRESH_FROM - 1}, scored on fresh ones: those from {FRESH_FROM}, scored "
                "after its structure was fixed")
    if (folds, repeats) == (2, 1):
        return "fitted"
    return f"fitted on {folds - 1}/{folds} of the composites, {repeats} random fold assignment" + "s" * (repeats > 1)


def with_coarse(errors: np.ndarray, grid: list[int], coarse: np.ndarray, coarse_grid: list[int]) -> np.ndarray:
    """[images, classes + coarse, prompts, grid]: the pass's errors, then the coarse candidates' at their timesteps
    (NaN elsewhere)."""
    combined = np.full((errors.shape[0], errors.shape[1] + coarse.shape[1], errors.shape[2], len(grid)), np.nan)
    combined[:, :errors.shape[1]] = errors
    combined[:, errors.shape[1]:, :, [grid.index(t) for t in coarse_grid]] = coarse
    return combined


def strategy_row(name: str, predictions: np.ndarray, nfe: np.ndarray, config: dict, labels: np.ndarray,
                 exhaustive: np.ndarray, fits: list | None = None) -> dict:
    """One table row (accuracy, its paired difference from exhaustive, agreement, NFE), printed as it goes.

    predictions and nfe: per image, or [repeats, images] for a fitted strategy cross-fitted over several random
    fold assignments: each image's outcome is then its mean over the repeats (standard errors over images),
    NFE the mean and 95th percentile over every (repeat, image)."""
    predictions, nfe = np.atleast_2d(predictions), np.asarray(nfe, dtype=float)
    correct, agree = (predictions == labels).mean(axis=0), (predictions == exhaustive).mean(axis=0)
    difference, stderr = paired_difference(correct, exhaustive == labels)
    row = {"strategy": name, "config": config, "images": predictions.shape[1], "accuracy": float(correct.mean()),
           "accuracy_standard_error": standard_error(correct),
           "accuracy_minus_exhaustive": difference, "difference_standard_error": stderr,
           "agreement": float(agree.mean()), "agreement_standard_error": standard_error(agree),
           "nfe_mean": float(nfe.mean()), "nfe_p95": float(np.percentile(nfe, 95))}
    if len(predictions) > 1:
        row["repeats"] = len(predictions)
        row["nfe_mean_per_repeat"] = [float(x) for x in np.reshape(nfe, (len(predictions), -1)).mean(axis=1)]
    if fits:
        row["fits"] = fits
    print(f"{name:<66} acc {row['accuracy']:.3f} ({difference:+.3f} +- {stderr:.3f})  agree {row['agreement']:.3f}"
          f"  NFE {row['nfe_mean']:7.1f} (p95 {row['nfe_p95']:.0f})", flush=True)
    return row


def compare(errors: np.ndarray, labels: np.ndarray, grid: list[int], strategies: dict, args, nfe_cap: int,
            coarse: tuple | None = None, cascades: tuple = CASCADES) -> list[dict]:
    """Every strategy replayed on the stored errors, the first looks and cascades ((first or its options, miss
    rate, calibration) each) cross-fitted, the coarse-to-fine rows on the combined table (coarse: (combined errors,
    families, all labels, coarse grid size)); one row each."""
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    rows = []
    rate, miss = args.error_rate, args.miss_rate

    def add(name, predictions, nfe, config, fits=None):
        rows.append(strategy_row(name, predictions, nfe, config, labels, exhaustive, fits))

    for name, strategy in strategies.items():
        add(name, *replayed(strategy, errors, grid), strategy.describe())
    for k in [k for k in (1, 2, 3) if k < len(grid)]:
        def fit(held_out, k=k):
            return fit_first_look(held_out, grid, n_timesteps=k, miss_rate=miss)

        for cap in (None, nfe_cap):
            def make(first, cap=cap):
                return Elimination(rate - miss, max_timesteps=len(grid), first_look=first, max_nfe=cap)

            name = f"first look {k} (miss {miss}) + elimination {rate - miss:g}" + (f", max_nfe {cap}" if cap else "")
            try:
                predictions, nfe, fits = cross_fitted(make, fit, errors, grid)
            except UserError as exc:  # too few images to fit a first look on half of them
                print(f"{name}: skipped ({exc})", flush=True)
                continue
            add(name, predictions, nfe, {**make(None).describe(), "first_look": "cross-fitted"}, fits)
    for first, miss, calibration, *protocol in cascades:
        def fit_one(held_out, first=first, miss=miss, calibration=calibration):
            return fit_cascade(held_out, grid, miss, first, calibration=calibration)

        folds, repeats = protocol or (2, 1)
        name = (f"cascade ({fitted_how(folds, repeats)}, miss {miss}, {CALIBRATIONS[calibration]}): first "
                f"{options(first)}, then {doubling(len(grid))} and the grid")
        predictions, nfe, fits = cross_fitted(lambda fitted: fitted, fit_one, errors, grid, folds, repeats)
        add(name, predictions, nfe, {"name": "cascade", "first": first, "miss_rate": miss, "calibration": calibration,
                                     "fitted": "cross-fitted", "folds": folds, "repeats": repeats}, fits)
    if coarse is not None:
        combined, families, labels_all, coarse_points = coarse
        for keep in (2, 3, 5):
            for k in sorted({min(2, coarse_points), min(3, coarse_points)}):
                strategy = CoarseToFine(families, keep=keep, timesteps=k, grid=coarse_points,
                                        then=Elimination(rate, max_timesteps=len(grid))).resolve(labels_all)
                name = f"coarse-to-fine at {k} timesteps, keep {keep} per level, then elimination {rate}"
                config = {**strategy.describe(), "families": f"{len(families)} levels of coarse candidates"}
                add(name, *replayed_fine(strategy, combined, grid, errors.shape[1]), config)
    return rows




def options(k) -> str:
    """A cascade's timestep count as a row names it: one number, or the options it chose among on held-out images."""
    return str(k) if isinstance(k, int) else f"{'/'.join(map(str, k))} (chosen on held-out)"


def doubling(grid: int) -> str:
    from diffusion_classifier.engine.shortlists import doubling_stages

    return "/".join(str(k) for k in doubling_stages(grid))


def section_strategies(args, out: dict) -> None:
    errors, labels, grid = stored_pass(args.images)
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    n = len(errors)
    print(f"{n} images stored; exhaustive-{GRID} accuracy {np.mean(exhaustive == labels):.3f}", flush=True)
    rate = args.error_rate
    strategies = {f"exhaustive {k} (even subset)": FixedTimesteps(even_subset(grid, k)) for k in (5, 10, 20)}
    strategies[f"exhaustive {GRID}"] = Exhaustive(GRID)
    strategies["staged 5/50 keep 5/1 (the paper's fast variant, CIFAR-10/Pets shape)"] = Staged([5, GRID], [5, 1])
    strategies["staged 3/5/25/50 keep 45/5/1/1 (the paper's ImageNet shape, scaled)"] = Staged(
        [3, 5, 25, GRID], [45, 5, 1, 1])
    for r in (0.05, 0.2):
        strategies[f"elimination {r}, normal bound (before)"] = Elimination(r, max_timesteps=GRID, bound="normal")
        strategies[f"elimination {r}, t bound"] = Elimination(r, max_timesteps=GRID)
    strategies[f"elimination {rate}, top-10 shortlist after 8"] = Elimination(rate, max_timesteps=GRID, shortlist=10)
    coarse = None
    if args.coarse:
        families = coarse_captions()
        combined = with_coarse(errors, grid, coarse_errors(n, args), as_grid(COARSE_GRID))
        coarse = (combined, list(families.values()),
                  captions() + [label for family in families.values() for label in family], COARSE_GRID)
    out["strategies"] = compare(errors, labels, grid, strategies, args, 300, coarse)
    out["meta"] = {"images": n, "grid": GRID, "classes": len(PAIRS), "model": MODEL,
                   "weights": model_fingerprint(MODEL), "exhaustive_accuracy": float(np.mean(exhaustive == labels)),
                   "error_rate": rate, "miss_rate": args.miss_rate}


# cascades with the triples model's coarse levels: (the levels' timesteps, each level a (family, count or options);
# first fine stage; miss rate; calibration; folds of the cross-fitting; random fold assignments averaged over)
LEVELS_ONCE = ((0, 4), (1, 4))
LEVELS_CHOSEN = ((0, LEVEL_OPTIONS), (1, LEVEL_OPTIONS))
LEVELS_TWICE = ((0, 2), (0, 4), (1, 2), (1, 4))  # each family twice, doubling: 2 timesteps, then 4 more
LEVELS_TWICE_CHOSEN = ((0, (1, 2, 3)), (0, (2, 4)), (1, (1, 2, 3)), (1, (2, 4)))
LEVEL_CASCADES = ((LEVELS_ONCE, 1, 0.1, "union", 2, 1), (LEVELS_CHOSEN, 1, 0.1, "joint", 2, 1),
                  (LEVELS_CHOSEN, 1, 0.05, "joint", 2, 1),
                  (LEVELS_TWICE, 3, 0.05, "joint", 2, 3), (LEVELS_TWICE, 3, 0.05, "joint", 6, 3),
                  (LEVELS_TWICE, 3, 0.1, "joint", 6, 3), (LEVELS_TWICE_CHOSEN, 3, 0.05, "joint", 6, 1),
                  (LEVELS_TWICE, 3, 0.05, "joint", "fresh", 1), (LEVELS_TWICE_CHOSEN, 3, 0.05, "joint", "fresh", 1))
# LEVELS_TWICE was chosen looking at composites 0-599; the "fresh" rows test it on composites scored afterwards
FRESH_FROM = 600
# with --learned-coarse: its families (learn-coarse's "*, *, c", which the model's training never named) follow
# the model's two; THIRD stands for the third item's, placed after the first item, before the first two
THIRD = "third item (learned)"
LEVELS_THIRD = ((0, 2), (0, 4), (THIRD, 2), (THIRD, 4), (1, 2), (1, 4))
LEARNED_CASCADES = ((LEVELS_THIRD, 3, 0.05, "joint", 2, 3), (LEVELS_THIRD, 3, 0.05, "joint", 6, 3),
                    (LEVELS_THIRD, 3, 0.05, "joint", "fresh", 1))


def family_name(family: dict) -> str:
    """A triples family by the positions its coarse labels name: "first item", "first two", and those a triples
    model's training never names (learn-coarse's): "third item (learned)", ..."""
    known = tuple(part != "*" for part in next(iter(family)).split(", "))
    return {(True, False, False): "first item", (True, True, False): "first two",
            (False, True, False): "middle item (learned)", (False, False, True): "third item (learned)"}.get(
        known, "a family")


def level_name(levels, first, miss, calibration, folds, repeats, picked, grid: int,
               names=("first item", "first two")) -> str:
    """A row's name: each coarse level's timesteps (options chosen on held-out images: "1/2/3"; a family's return:
    "+4"), the fine stages after them and how the cascade was fitted. `names`: the families' names."""
    from diffusion_classifier.engine.shortlists import doubling_stages

    seen, parts = set(), []
    for family, k in levels:
        count = str(k) if isinstance(k, int) else "/".join(map(str, k))
        parts.append(f"{names[family]} at {'+' if family in seen else ''}{count}")
        seen.add(family)
    chosen = any(not isinstance(k, int) for _, k in levels)
    at = ", ".join(parts) + (f" timesteps (chosen on held-out: {picked})" if chosen else " timesteps")
    return (f"cascade ({fitted_how(folds, repeats)}, miss {miss}, {CALIBRATIONS[calibration]}) with coarse levels: "
            f"{at}, then first {first}, {'/'.join(str(k) for k in doubling_stages(grid) if k > first)} and the grid")


def cascade_with_levels(errors, coarse, combined, labels, grid, fine, coarse_labels, families,
                        cascades=LEVEL_CASCADES) -> list[dict]:
    """Cascades whose coarse levels (first item, then first two items: the triples model's partial classes) come
    before the fine stages, cross-fitted: each image replayed by a cascade fitted on the other folds. The union bound
    with 4 timesteps per level (the best of 7 settings tried on these composites before the joint calibration); the
    joint calibration with each level's timesteps chosen among LEVEL_OPTIONS on held-out images; each level twice
    (one of about ten structures tried on composites 0-599 this way), fitted on half and on 5/6 of the composites:
    the conformal gaps are a tail quantile, so the cost depends on the calibration set, and these rows average over
    random fold assignments; and fitted on composites 0-599, scored on the ones after (where the pass holds them),
    which played no part in choosing the structure."""
    column = {label: i for i, label in enumerate(coarse_labels)}
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    every = np.arange(len(errors))
    rows = []
    for levels, first, miss, calibration, folds, repeats in cascades:
        if folds == "fresh":  # fitted on the composites before FRESH_FROM, scored on those after
            if len(errors) <= FRESH_FROM:
                continue
            plan = [[(every[:FRESH_FROM], every[FRESH_FROM:])]]
        else:
            plan = [[(np.setdiff1d(every, scored), scored) for scored in parts]
                    for parts in fold_assignments(len(errors), folds, repeats)]
        predictions, nfe, fits = np.zeros((repeats, len(errors)), int), np.zeros((repeats, len(errors))), []
        for repeat, parts in enumerate(plan):
            for held_out, scored in parts:
                fitted_levels = [(families[f], coarse[held_out][:, [column[c] for c in families[f]]], k)
                                 for f, k in levels]
                cascade = fit_cascade(errors[held_out], grid, miss, first, labels=fine, levels=fitted_levels,
                                      calibration=calibration).resolve(fine + coarse_labels)
                rows_used = [len(fine) + column[c] for c in cascade.extra_candidates()]
                predictions[repeat, scored], nfe[repeat, scored] = replayed_fine(cascade, combined[scored], grid,
                                                                                  len(fine), rows_used)
                if repeat == 0 and len(fits) < 2:
                    fits.append(cascade.describe() | {"families": f"{len(cascade.families)} levels of coarse classes"})
        picked = " and ".join("/".join(str(len(stage["timesteps"])) for stage in fit["stages"][:len(levels)])
                              for fit in fits)
        config = {"name": "cascade", "levels": [[f, k] for f, k in levels], "first": first, "miss_rate": miss,
                  "calibration": calibration, "fitted": "cross-fitted", "folds": folds, "repeats": repeats}
        name = level_name(levels, first, miss, calibration, folds, repeats, picked, len(grid),
                          [family_name(f) for f in families])
        kept = np.sort(np.concatenate([scored for _, scored in plan[0]]))  # the images this row predicts
        rows.append(strategy_row(name, predictions[:, kept], nfe[:, kept], config, labels[kept], exhaustive[kept],
                                 fits))
    return rows


def section_ten_way(args, out: dict) -> None:
    """Elimination before (normal bound) and after (t bound) on 10 classes: the stored exhaustive run of
    fashion-mnist-class (its earlier weights) on 2,000 test images, 50-timestep grid, replayed."""
    runs = sorted(RUNS.glob(f"fashion-mnist-class-*-test2000-grid{GRID}"))
    if not runs:
        print("10-way: no stored fashion-mnist-class grid run in benchmarks/runs; skipped")
        return
    errors, labels, grid = stored_grid(runs[-1])
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    table = []
    for rate in (0.01, 0.05, 0.2):
        for bound in ("normal", "t"):
            predictions, nfe = replayed(Elimination(rate, max_timesteps=GRID, bound=bound), errors, grid)
            correct = predictions == labels
            row = {"strategy": f"elimination {rate}, {bound} bound", "images": len(errors), "run": runs[-1].name,
                   "accuracy": float(correct.mean()), "accuracy_standard_error": standard_error(correct),
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


THOUSAND_PART = 300  # composites per stored 1,000-way pass (a later part adds the next ones)


def triples_manifest(start: int, stop: int, names: list[str]) -> str:
    """Three-item test composites start..stop-1 (triples.test_composites, whose first n are the same for any
    larger n) as PNGs and a manifest labelled by the model's class names."""
    from PIL import Image

    from diffusion_classifier.training import triples

    part = f"triples-test{stop}" if start == 0 else f"triples-test{start}-{stop}"
    relative = Path("runs") / "many_classes" / part / "manifest.jsonl"
    path = ROOT / relative
    if not path.is_file():
        images, labels = fashion_mnist_arrays("test")
        pictures, ids = triples.test_composites(images, labels, stop)
        (path.parent / "images").mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (picture, k) in enumerate(zip(pictures[start:], ids[start:]), start):
            Image.fromarray(picture).save(path.parent / f"images/{i:05d}.png")
            lines.append(json.dumps({"path": f"images/{i:05d}.png", "label": names[int(k)]}))
        atomic_write_text("\n".join(lines) + "\n", path)
    return str(relative)


def section_thousand(args, out: dict) -> None:
    """The 1,000-way task: a triples model (train --layout triples) on three-item test composites, an exhaustive
    pass on an even grid of --thousand-grid timesteps stored by `evaluate` (resumable, within --minutes), the
    110 coarse classes on the whole grid (cached), and the strategies replayed."""
    from diffusion_classifier import load_denoiser
    from diffusion_classifier.data import manifest
    from diffusion_classifier.training import triples

    if not args.triples_model:
        print("1,000-way: no --triples-model given; skipped")
        return
    from diffusion_classifier.runtime import parse_device

    model, grid_size = args.triples_model, args.thousand_grid
    denoiser = load_denoiser(model, device=parse_device(args.device), dtype=args.dtype)
    names = denoiser.class_names
    fine = names[:triples.FINE]
    deadline = time.monotonic() + 60 * args.minutes
    parts, datasets = [], []
    for start in range(0, args.thousand_images, THOUSAND_PART):  # parts of 300: a larger pass keeps the stored ones
        stop = min(start + THOUSAND_PART, args.thousand_images)
        data = triples_manifest(start, stop, names)
        span = f"test{stop}" if start == 0 else f"test{start}-{stop}"
        run_dir = RUNS / f"many-classes-{Path(model).name}-{model_fingerprint(model)[:10]}-{span}-grid{grid_size}"
        run = EvaluationRun(model=model, data=data, out=run_dir.relative_to(ROOT), labels=tuple(fine),
                            scoring={"strategy": Exhaustive(grid_size), "batch_size": args.batch_size})
        while time.monotonic() < deadline:
            metrics = run_evaluation(run, denoiser=denoiser, progress=False, max_new=args.chunk)
            print(f"1,000-way pass, composites {start}-{stop}: {metrics['images']} stored, accuracy "
                  f"{metrics['accuracy']:.3f}", flush=True)
            if metrics.get("complete"):
                break
        if not (ROOT / run.out / "run.json").is_file():  # out of time before this part began
            break
        parts.append(stored_grid(run.out))
        datasets.append(manifest(ROOT / data))
    errors, labels = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    grid = parts[0][2]
    if any(p[2] != grid for p in parts):
        raise SystemExit("the 1,000-way parts were stored on different grids")
    coarse_labels = names[triples.FINE:]
    # the coarse grid must lie on the fine one: even grids nest when the fine size is an odd multiple of the coarse
    coarse_points = max(c for c in range(1, min(COARSE_GRID, grid_size) + 1)
                        if grid_size % c == 0 and (grid_size // c) % 2 == 1)
    coarse_grid = as_grid(coarse_points)
    if not set(coarse_grid) <= set(grid):
        raise SystemExit(f"the coarse timesteps {coarse_grid} are not all on the {grid_size}-point grid")
    # the coarse candidates on the whole grid: a cascade's coarse levels choose their timesteps from it
    every_part = SimpleNamespace(items=[item for dataset in datasets for item in dataset.items])
    cache = f"many_classes_triples_coarse_grid_{model_fingerprint(model)[:10]}.npz"  # one per model
    coarse = cached_errors(cache, model, lambda: denoiser, coarse_labels, None,
                           every_part, len(errors), grid, args)
    # learn-coarse's families for the same network: scored and cached like the model's own, levels of their own
    learned = learned_coarse(args.learned_coarse, denoiser, every_part, len(errors), grid, args) if (
        args.learned_coarse) else None
    if args.store_only:
        return
    strategies = {f"exhaustive {k} (even subset)": FixedTimesteps(even_subset(grid, k)) for k in (2, 5)
                  if k < grid_size}
    strategies[f"exhaustive {grid_size}"] = Exhaustive(grid_size)
    strategies["staged (the paper's ImageNet schedule shape: keep 500/50/10/1)"] = Staged(
        [max(1, grid_size // 20), max(1, grid_size // 10), grid_size // 2, grid_size], [500, 50, 10, 1])
    strategies[f"elimination {args.error_rate}, t bound"] = Elimination(args.error_rate, max_timesteps=grid_size)
    families, coarse_labels = triples.coarse_families(names), list(coarse_labels)
    combined = with_coarse(errors, grid, coarse, grid)
    rows = compare(errors, labels, grid, strategies, args, 400,
                   (combined, families, fine + coarse_labels, coarse_points),
                   cascades=((1, 0.1, "union"), (1, 0.1, "joint")))
    cascades = LEVEL_CASCADES
    if learned:  # the model's families, then the learned ones
        learned_families, learned_labels, learned_errors, learned_meta = learned
        coarse, coarse_labels = np.concatenate([coarse, learned_errors], axis=1), coarse_labels + learned_labels
        families = families + learned_families
        combined = with_coarse(errors, grid, coarse, grid)
        named = [family_name(f) for f in families]
        if THIRD in named:
            cascades += tuple((tuple((named.index(f) if f == THIRD else f, k) for f, k in levels), *rest)
                              for levels, *rest in LEARNED_CASCADES)
        else:
            print(f"1,000-way: {args.learned_coarse} holds no third-item family; its rows are skipped", flush=True)
    out["thousand"] = rows + cascade_with_levels(errors, coarse, combined, labels, grid, fine, coarse_labels,
                                                 families, cascades)
    exhaustive = errors[:, :, 0].mean(axis=2).argmin(axis=1)
    out["thousand_meta"] = {"images": len(errors), "grid": grid_size, "classes": triples.FINE, "model": str(model),
                            "weights": model_fingerprint(model), "coarse_grid": coarse_points,
                            "exhaustive_accuracy": float(np.mean(exhaustive == labels))}
    if learned:
        out["thousand_meta"]["learned_coarse"] = learned[3]
    summary = Path(model) / "training_summary.json"  # a local training run says how it was trained
    if summary.is_file():
        trained = json.loads(summary.read_text())
        config = trained["config"]
        out["thousand_meta"]["training"] = (
            f"{config['architecture']} at {config['resolution']} px, {trained['epochs']:.0f} epochs of 60,000 "
            f"composites in {trained['train_seconds'] / 60:.0f} {trained['device'].upper()}-minutes")


def learned_coarse(directory: str, denoiser, every_part, n: int, grid: list[int], args):
    """(families, labels, errors [n, labels, 1, grid], metadata) of a learn-coarse model extending `denoiser`
    (refused unless its network and classes are the same, so the stored fine pass stands for it), its new classes
    cached like the model's own coarse ones; the metadata is its training summary."""
    import torch

    from diffusion_classifier import load_denoiser
    from diffusion_classifier.training.coarse import FAMILIES_FILE

    extended = load_denoiser(directory, device=denoiser.device, dtype=args.dtype)
    names = denoiser.class_names
    base, other = denoiser.network.state_dict(), extended.network.state_dict()
    same = extended.class_names[:len(names)] == names and set(base) == set(other) and all(
        torch.equal(base[k], other[k][:len(base[k])] if k == "class_embedding.weight" else other[k]) for k in base)
    if not same:
        raise SystemExit(f"{directory} does not extend {args.triples_model} (learn-coarse --model it writes one)")
    families = json.loads((Path(directory) / FAMILIES_FILE).read_text())
    labels = list(extended.class_names[len(names):])
    cache = f"many_classes_triples_learned_grid_{model_fingerprint(directory)[:10]}.npz"
    errors = cached_errors(cache, directory, lambda: extended, labels, None, every_part, n, grid, args)
    summary = Path(directory) / "coarse_summary.json"
    meta = {**(json.loads(summary.read_text()) if summary.is_file() else {}), "model": str(directory),
            "weights": model_fingerprint(directory), "families": [family_name(f) for f in families]}
    return families, labels, errors, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["pass", "strategies", "ten-way", "simulation"],
                        choices=["states", "pass", "strategies", "ten-way", "simulation", "thousand"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=600.0, help="time budget of the pass in this call")
    parser.add_argument("--chunk", type=int, default=30, help="images per commit of the pass")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--error-rate", type=float, default=0.05, help="the promise of the first-look rows (total)")
    parser.add_argument("--miss-rate", type=float, default=0.02, help="the first look's share of it")
    parser.add_argument("--out", default="many_classes", help="results/OUT.json (merged into when it exists)")
    parser.add_argument("--triples-model", help="thousand: a model trained with `train --layout triples`")
    parser.add_argument("--thousand-images", type=int, default=300)
    parser.add_argument("--thousand-grid", type=int, default=20, help="thousand: the exhaustive pass's grid")
    parser.add_argument("--learned-coarse", help="thousand: a learn-coarse model extending --triples-model (its "
                        "coarse families, e.g. the third item, become levels of their own rows)")
    parser.add_argument("--coarse", action="store_true", help="strategies: add the coarse-to-fine rows (scores the "
                        "20 partial captions at 10 timesteps of the stored images first, cached); pass: score them "
                        "after the pass")
    parser.add_argument("--device", default="auto", help="where the passes score (auto: CUDA where it is)")
    parser.add_argument("--dtype", default="auto", help="their dtype (auto: bfloat16 on CUDA, else float32)")
    parser.add_argument("--states", help="a file of the pairs model's caption token states (--sections states "
                        "writes it; pass and --coarse read it instead of running the text encoder)")
    parser.add_argument("--store-only", action="store_true", help="score and store the passes and coarse caches; "
                        "replay nothing")
    args = parser.parse_args()
    os.chdir(ROOT)  # the stored run names its data relative to the repository root
    tune_cpu_allocator()
    RESULTS.mkdir(exist_ok=True)
    if "states" in args.sections:
        section_states(args)
    if "pass" in args.sections:
        section_pass(args)
    path = RESULTS / f"{args.out}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for name, section in (("strategies", section_strategies), ("ten-way", section_ten_way),
                          ("simulation", section_simulation), ("thousand", section_thousand)):
        if name in args.sections and not (args.store_only and name != "thousand"):
            section(args, out)
            if args.store_only:
                continue
            atomic_write_text(json.dumps(out, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
