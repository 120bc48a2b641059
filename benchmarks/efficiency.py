"""Accuracy vs cost of the strategies, and engine throughput, on the shipped Fashion-MNIST models.

    python -m benchmarks.efficiency --images 500
    python -m benchmarks.efficiency --images 200 --sections throughput
    python -m benchmarks.efficiency --sections calibration --calibration-images 2000

Same test images (the fixed seeded subset of common.py) and seeds for every row. One exhaustive pass
over an even grid of --grid timesteps is stored; every strategy on that grid is then replayed on the
stored errors, which gives exactly its decisions and NFE (noise is keyed by image and timestep). Rows:
exhaustive subsets, the paper's staged schedule (the 25/250 keep 5/1 variant on the 250 grid; its
CIFAR-10 preset, 50/500, runs directly with --with-cifar-preset), and the elimination strategy at
several error rates (one also run directly). For each: accuracy, mean and 95th-percentile NFE per
image, and seconds per image. Also: images/s of the batched engine vs a
per-image loop of the same algorithm (one image at a time, batches of (class, timestep) pairs, as the
original code does), the share of wall time spent in the network forward, and the forward's own
throughput at several batch sizes (which bounds what batching can gain on this device). And calibration: a
temperature fitted on half of a labelled set, with NLL and ECE before and after on the other half.
Writes benchmarks/results/efficiency.json and efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, Staged, load_denoiser, preset
from diffusion_classifier.adapters.schedules import even_timesteps
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.scoring import image_seed, noise_for
from diffusion_classifier.engine.strategies import FixedTimesteps
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator

from .common import RESULTS, model_fingerprint, replayed_accuracy, stored_test_errors, test_subset, to_pixels

GRID_CACHE = RESULTS / "efficiency_grid.npz"  # the exhaustive pass's errors (not committed: a cache)
CLASS_TREE = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist" / "class_tree.json"


def test_images(n: int) -> tuple[torch.Tensor, np.ndarray]:
    subset = test_subset(n)
    images, labels = fashion_mnist_arrays("test")
    return to_pixels(images[subset]), labels[subset]


def run_strategy(clf: DiffusionClassifier, pixels: torch.Tensor, labels: np.ndarray, chunk: int = 64) -> dict:
    started = time.perf_counter()
    results = []
    for i in range(0, len(pixels), chunk):
        results += clf.classify_pixels(pixels[i:i + chunk], [str(j) for j in range(i, i + chunk)])
    wall = time.perf_counter() - started
    nfe = np.array([r.nfe for r in results])
    correct = np.array([r.prediction_index for r in results]) == labels
    return {"accuracy": float(correct.mean()), "nfe_mean": float(nfe.mean()), "nfe_p95": float(np.percentile(nfe, 95)),
            "seconds_per_image": wall / len(pixels), "images": len(pixels)}


def section_strategies(pixels, labels, args, out):
    """One exhaustive pass over the finest grid, then every strategy replayed on its stored errors.

    Noise is keyed by (image, timestep), so replaying a strategy on the stored errors gives exactly the
    decisions and NFE of running it (tests/test_scoring.py checks this). Seconds per image of replayed
    rows are NFE times the measured seconds per network evaluation of the exhaustive pass; the
    elimination row at --direct-error-rate is also run directly to check that estimate.
    """
    denoiser = load_denoiser(args.model)
    grid_size = args.grid
    errors, grid, seconds_per_nfe = grid_pass(denoiser, pixels, args)
    path = RESULTS / "efficiency.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if previous.get("meta", {}).get("strategies", {}).get("images") != len(pixels):
        previous = {}
    strategies = {f"exhaustive {k} (every {grid_size // k}th of the grid)":
                  FixedTimesteps(grid[(grid_size // k) // 2::grid_size // k][:k]) for k in args.exhaustive}
    strategies[f"exhaustive {grid_size}"] = Exhaustive(grid_size)
    strategies[f"staged {grid_size // 10}/{grid_size} keep 5/1 (paper's fast variant)"] = Staged(
        [grid_size // 10, grid_size], [5, 1])
    for rate in args.error_rates:
        strategies[f"elimination error_rate={rate}"] = Elimination(error_rate=rate, max_timesteps=grid_size)
    staged = strategies[f"staged {grid_size // 10}/{grid_size} keep 5/1 (paper's fast variant)"]
    staged_nfe = replay(staged, errors[0], grid).nfe  # the same for every image
    for fraction in (5, 10):  # the target: at most 1/5 of the staged schedule's NFE
        budget = staged_nfe // fraction
        strategies[f"elimination error_rate=0.05, max_nfe={budget} (1/{fraction} of staged)"] = Elimination(
            0.05, max_nfe=budget, max_timesteps=grid_size)
    strategies["elimination error_rate=0.05, shortlist 3"] = Elimination(0.05, max_timesteps=grid_size, shortlist=3)
    tree = json.loads(CLASS_TREE.read_text())
    strategies["elimination error_rate=0.05, class tree keep 2"] = Elimination(
        0.05, max_timesteps=grid_size, class_tree=tree, keep_groups=2).resolve(denoiser.class_names)
    rows = []
    for name, strategy in strategies.items():
        row = {"strategy": name, "config": strategy.describe(), **replayed_accuracy(strategy, errors, grid, labels)}
        row.update(seconds_per_image=row["nfe_mean"] * seconds_per_nfe, seconds="estimated from NFE")
        rows.append(row)
        print(f"{name:<48} acc {row['accuracy']:.4f}  NFE mean {row['nfe_mean']:7.1f}  p95 {row['nfe_p95']:7.1f}  "
              f"~{row['seconds_per_image']:.3f} s/img", flush=True)
    name = f"elimination error_rate={args.direct_error_rate} (run directly)"
    row = next((r for r in previous.get("strategies", []) if r["strategy"] == name), None) if args.keep_direct else None
    if row is None:
        strategy = Elimination(error_rate=args.direct_error_rate, max_timesteps=grid_size)
        direct = DiffusionClassifier(denoiser, strategy=strategy, batch_size=args.batch_size)
        row = {"strategy": name, "config": direct.strategy.describe(), **run_strategy(direct, pixels, labels),
               "seconds": "measured"}
    rows.append(row)
    print(f"{row['strategy']:<48} acc {row['accuracy']:.4f}  NFE mean {row['nfe_mean']:7.1f}  "
          f"{row['seconds_per_image']:.3f} s/img (measured)", flush=True)
    if args.with_cifar_preset:
        cifar = DiffusionClassifier(denoiser, strategy=preset("cifar10").strategy, loss="l2",
                                    batch_size=args.batch_size)
        row = {"strategy": "staged cifar10 preset 50/500 keep 5/1 (run directly, l2)",
               "config": cifar.strategy.describe(), **run_strategy(cifar, pixels, labels), "seconds": "measured"}
        rows.append(row)
        print(f"{row['strategy']:<48} acc {row['accuracy']:.4f}  NFE mean {row['nfe_mean']:7.1f}", flush=True)
    out["strategies"] = rows
    out["seconds_per_nfe"] = seconds_per_nfe
    plot(rows)


def grid_pass(denoiser, pixels, args) -> tuple[np.ndarray, list[int], float]:
    """Errors of every class at every timestep of the grid, per image; cached in results/ by settings."""
    key = {"model": args.model, "weights": model_fingerprint(args.model), "images": len(pixels), "grid": args.grid,
           "seed": 0, "loss": "l2"}
    if GRID_CACHE.exists():
        cached = np.load(GRID_CACHE, allow_pickle=False)
        if json.loads(str(cached["key"])) == key:
            print("reusing the stored grid pass", GRID_CACHE, flush=True)
            return cached["errors"], cached["grid"].tolist(), float(cached["seconds_per_nfe"])
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(args.grid), loss="l2", batch_size=args.batch_size)
    started = time.perf_counter()
    full = []
    for i in range(0, len(pixels), 64):
        full += clf.classify_pixels(pixels[i:i + 64], [str(j) for j in range(i, i + 64)])
    seconds_per_nfe = (time.perf_counter() - started) / sum(r.nfe for r in full)
    errors, grid = np.stack([r.errors for r in full]), full[0].timesteps
    tmp = GRID_CACHE.with_suffix(".tmp.npz")
    np.savez(tmp, errors=errors, grid=np.array(grid), seconds_per_nfe=seconds_per_nfe, key=json.dumps(key))
    tmp.replace(GRID_CACHE)
    return errors, grid, seconds_per_nfe


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, row in enumerate(rows, start=1):
        marker = {"exhaustive": "o", "fixed": "o", "staged": "s", "elimination": "^"}[row["config"]["name"]]
        ax.scatter(row["nfe_mean"], row["accuracy"], marker=marker, label=f"{i}. {row['strategy']}")
        ax.annotate(str(i), (row["nfe_mean"], row["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="mean NFE per image", ylabel="accuracy", title="accuracy vs cost")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(RESULTS / "efficiency.png", dpi=120)


def section_calibration(pixels, labels, args, out):
    """Temperature fitted on one half of a labelled set, judged (NLL, ECE) on the other half.

    Uses its own, larger image set (--calibration-images) scored exhaustively at
    --calibration-timesteps: ECE over a few hundred images is too noisy to judge a 0.03 target.
    """
    from diffusion_classifier.engine.probabilities import (
        expected_calibration_error,
        negative_log_likelihood,
        relative_scores,
        softmax_of_errors,
        timestep_gaps,
        weighted_probabilities,
    )
    from diffusion_classifier.tasks.calibration import fit_temperature, fit_timestep_weights

    pixels, labels = test_images(args.calibration_images)
    strategy = Exhaustive(args.calibration_timesteps)
    key = json.dumps({"model": args.model, "weights": model_fingerprint(args.model), "images": len(pixels),
                      "timesteps": args.calibration_timesteps})
    cache = RESULTS / "calibration_errors.npz"  # not committed: a cache of the scoring pass
    denoiser = load_denoiser(args.model)
    timesteps = even_timesteps(denoiser.num_train_timesteps, args.calibration_timesteps)
    stored = stored_test_errors(args.model, test_subset(len(labels)), timesteps)
    if stored is not None:
        errors = stored
        print("calibration: errors taken from the stored exhaustive run in benchmarks/runs (no network evaluations)")
    elif cache.exists() and str(np.load(cache)["key"]) == key:
        errors = np.load(cache)["errors"]
    else:
        clf = DiffusionClassifier(denoiser, strategy=strategy, batch_size=args.batch_size)
        results = []
        for i in range(0, len(pixels), 64):
            results += clf.classify_pixels(pixels[i:i + 64], [str(j) for j in range(i, i + 64)])
        errors = np.stack([r.errors[:, 0] for r in results])  # [images, classes, timesteps]
        np.savez(cache.with_suffix(".tmp.npz"), errors=errors, key=key)
        cache.with_suffix(".tmp.npz").replace(cache)
    leaders = errors.mean(axis=2).argmin(axis=1)
    relative = np.stack([relative_scores(e[:, None], int(k)) for e, k in zip(errors, leaders)])
    grid = list(range(errors.shape[2]))  # columns are already in timestep order
    gaps = np.stack([timestep_gaps(e[:, None], grid, int(k)) for e, k in zip(errors, leaders)])
    order = np.random.default_rng(0).permutation(len(labels))
    fit, held = order[: len(order) // 2], order[len(order) // 2:]
    temperature = fit_temperature(relative[fit], labels[fit])
    weights = fit_timestep_weights(gaps[fit], labels[fit])
    weighted = weighted_probabilities(gaps[held], weights)

    def judge(t: float) -> dict:
        probs = softmax_of_errors(relative[held], t)
        return {"nll": negative_log_likelihood(softmax_of_errors(relative[held], t), labels[held]),
                "ece": expected_calibration_error(probs, labels[held]),
                "mean_confidence": float(probs.max(axis=1).mean())}

    nll_weighted = float(-np.mean(np.log(np.clip(weighted[np.arange(len(held)), labels[held]], 1e-12, None))))
    out["calibration"] = {"strategy": strategy.describe(), "images": len(labels), "fit_images": len(fit),
                          "held_out_images": len(held), "temperature": temperature,
                          "accuracy_held_out": float(np.mean(relative[held].argmin(axis=1) == labels[held])),
                          "before (T=1)": judge(1.0), "after": judge(temperature),
                          "per_timestep_weights": {
                              "weights": weights.tolist(), "nll": nll_weighted,
                              "ece": expected_calibration_error(weighted, labels[held]),
                              "accuracy_held_out": float(np.mean(weighted.argmax(axis=1) == labels[held]))}}
    c = out["calibration"]
    print(f"calibration on {len(held)} held-out images: T={temperature:.4g}; NLL {c['before (T=1)']['nll']:.3f} -> "
          f"{c['after']['nll']:.3f}, ECE {c['before (T=1)']['ece']:.3f} -> {c['after']['ece']:.3f}; per-timestep "
          f"weights: NLL {nll_weighted:.3f}, ECE {c['per_timestep_weights']['ece']:.3f}, accuracy "
          f"{c['per_timestep_weights']['accuracy_held_out']:.3f} (vs {c['accuracy_held_out']:.3f})", flush=True)


@torch.inference_mode()
def per_image_loop(denoiser, pixels, n_timesteps: int, batch_size: int, seed: int) -> list[int]:
    """The same algorithm, one image at a time, batches of (class, timestep) pairs (the original's layout)."""
    conds = denoiser.embed_conditions(list(range(10)))
    grid = even_timesteps(denoiser.num_train_timesteps, n_timesteps)
    predictions = []
    for image in pixels:
        x0 = denoiser.encode_images(image[None])
        s = image_seed(seed, image)
        noise = torch.stack([noise_for(s, t, x0.shape[1:]) for t in grid])
        pairs = [(c, i) for c in range(10) for i in range(len(grid))]
        errors = np.zeros((10, len(grid)))
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            cls = torch.tensor([c for c, _ in chunk])
            idx = torch.tensor([i for _, i in chunk])
            t = torch.tensor(grid)[idx]
            e = denoiser.error(x0.expand(len(chunk), -1, -1, -1), noise[idx], t,
                               {k: v[cls] for k, v in conds.items()})
            errors[cls.numpy(), idx.numpy()] = e.numpy()
        predictions.append(int(errors.mean(axis=1).argmin()))
    return predictions


@torch.inference_mode()
def forward_throughput(denoiser, batch_sizes: list[int], evaluations: int = 2000) -> dict[str, float]:
    """Network evaluations per second of `denoiser.error` alone, at each batch size (same total work).

    If this curve is flat, batching cannot make the engine much faster than a loop with small
    batches: the forward is compute-bound and both pay the same per evaluation."""
    cond = denoiser.embed_conditions([0] if denoiser.conditioning == "class" else ["a photo of a shirt"])
    generator = torch.Generator().manual_seed(0)
    rates = {}
    for b in batch_sizes:
        x0 = torch.rand((b, *denoiser.latent_shape), generator=generator) * 2 - 1
        noise = torch.randn((b, *denoiser.latent_shape), generator=generator)
        t = torch.randint(0, denoiser.num_train_timesteps, (b,), generator=generator)
        batch_cond = {k: v.expand(b, *v.shape[1:]) for k, v in cond.items()}
        denoiser.error(x0, noise, t, batch_cond)  # warm-up
        reps = max(2, evaluations // b)
        started = time.perf_counter()
        for _ in range(reps):
            denoiser.error(x0, noise, t, batch_cond)
        rates[str(b)] = reps * b / (time.perf_counter() - started)
    return rates


def section_throughput(pixels, labels, args, out):
    pixels = pixels[: args.throughput_images]
    denoiser = load_denoiser(args.model)
    n = args.throughput_timesteps
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(n), batch_size=args.batch_size, images_per_batch=64)
    started = time.perf_counter()
    results = clf.classify_pixels(pixels, [str(i) for i in range(len(pixels))])
    engine_wall = time.perf_counter() - started
    network_share = clf.engine.stats.network_seconds / engine_wall
    started = time.perf_counter()
    loop_predictions = per_image_loop(denoiser, pixels, n, args.loop_batch_size, clf.config.seed)
    loop_wall = time.perf_counter() - started
    agree = float(np.mean(np.array(loop_predictions) == np.array([r.prediction_index for r in results])))
    out["throughput"] = {"timesteps": n, "images": len(pixels), "engine_images_per_s": len(pixels) / engine_wall,
                         "loop_images_per_s": len(pixels) / loop_wall, "speedup": loop_wall / engine_wall,
                         "engine_batch_size": args.batch_size, "loop_batch_size": args.loop_batch_size,
                         "network_share_of_wall": network_share, "prediction_agreement": agree,
                         "elimination": adaptive_throughput(denoiser, pixels, args),
                         "forward_nfe_per_s_by_batch": forward_throughput(denoiser, args.forward_batch_sizes)}
    t = out["throughput"]
    print(f"exhaustive {n}: engine {t['engine_images_per_s']:.2f} img/s (batch {args.batch_size}), per-image loop "
          f"{t['loop_images_per_s']:.2f} img/s (batch {args.loop_batch_size}): {t['speedup']:.2f}x; "
          f"network forward {100 * network_share:.1f}% of engine wall time; predictions agree {100 * agree:.1f}%")
    e = t["elimination"]
    print(f"elimination {e['error_rate']}: engine {e['engine_images_per_s']:.2f} img/s, one image at a time "
          f"{e['loop_images_per_s']:.2f} img/s: {e['speedup']:.2f}x (mean network batch {e['engine_mean_batch']:.0f} "
          f"vs {e['loop_mean_batch']:.1f}); network forward {100 * e['network_share_of_wall']:.1f}% of engine wall "
          f"time; decisions agree {100 * e['prediction_agreement']:.1f}%")
    print("forward alone, NFE/s by batch size: " + ", ".join(
        f"{b}: {rate:.0f}" for b, rate in t["forward_nfe_per_s_by_batch"].items()))


def adaptive_throughput(denoiser, pixels, args, error_rate: float = 0.05) -> dict:
    """The elimination strategy, batched across images by the engine vs one image at a time.

    One image at a time, each network call holds one image's round (its surviving classes at a few
    timesteps), so batches are small: the case batching across images is meant for. The per-image run is
    the same engine with one image per call and batches of at most --loop-batch-size, so decisions are
    identical; the mean batch sizes are reported."""
    runs = {}
    for name, images_per_batch, batch_size in (("engine", 64, args.batch_size), ("loop", 1, args.loop_batch_size)):
        clf = DiffusionClassifier(denoiser, strategy=Elimination(error_rate), batch_size=batch_size,
                                  images_per_batch=images_per_batch)
        started = time.perf_counter()
        results = clf.classify_pixels(pixels, [str(i) for i in range(len(pixels))])
        runs[name] = (time.perf_counter() - started, results, clf.engine.stats)
    (engine_wall, engine_results, stats), (loop_wall, loop_results, loop_stats) = runs["engine"], runs["loop"]
    return {"error_rate": error_rate, "images": len(pixels),
            "nfe_per_image": float(np.mean([r.nfe for r in engine_results])),
            "engine_images_per_s": len(pixels) / engine_wall, "loop_images_per_s": len(pixels) / loop_wall,
            "speedup": loop_wall / engine_wall, "network_share_of_wall": stats.network_seconds / engine_wall,
            "engine_mean_batch": stats.evaluations / stats.network_calls,
            "loop_mean_batch": loop_stats.evaluations / loop_stats.network_calls,
            "prediction_agreement": float(np.mean([a.prediction_index == b.prediction_index
                                                   for a, b in zip(engine_results, loop_results)]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--model", default="fashion-mnist-class")
    parser.add_argument("--sections", nargs="+", default=["strategies", "throughput", "calibration"],
                        choices=["strategies", "throughput", "calibration"])
    parser.add_argument("--grid", type=int, default=250, help="timesteps of the exhaustive pass")
    parser.add_argument("--exhaustive", type=int, nargs="+", default=[10, 25, 50], help="exhaustive rows (subsets)")
    parser.add_argument("--error-rates", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--direct-error-rate", type=float, default=0.05)
    parser.add_argument("--keep-direct", action="store_true",
                        help="reuse the directly run row of the last run with as many images (the grid is cached)")
    parser.add_argument("--throughput-images", type=int, default=None, help="default: --images")
    parser.add_argument("--with-cifar-preset", action="store_true", help="also run the 2,750-NFE preset directly")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--loop-batch-size", type=int, default=32, help="the original code's default")
    parser.add_argument("--throughput-timesteps", type=int, default=25)
    parser.add_argument("--forward-batch-sizes", type=int, nargs="+", default=[1, 8, 32, 128, 500],
                        help="batch sizes of the forward-only throughput curve")
    parser.add_argument("--calibration-images", type=int, default=2000)
    parser.add_argument("--calibration-timesteps", type=int, default=10)
    args = parser.parse_args()
    tune_cpu_allocator()
    pixels, labels = test_images(args.images)
    path = RESULTS / "efficiency.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for section in args.sections:
        part: dict = {}
        globals()[f"section_{section}"](pixels, labels, args, part)
        results.update(part)
        results.setdefault("meta", {})[section] = {"images": args.images, "model": args.model,
                                                   "model_weights_sha256": model_fingerprint(args.model),
                                                   "date": time.strftime("%Y-%m-%d %H:%M"),
                                                   "threads": torch.get_num_threads()}
        RESULTS.mkdir(exist_ok=True)
        atomic_write_text(json.dumps(results, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
