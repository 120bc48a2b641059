"""Accuracy vs cost of the strategies, and engine throughput, on the shipped Fashion-MNIST models.

    python benchmarks/efficiency.py --images 500
    python benchmarks/efficiency.py --images 200 --sections throughput

Same test images (fashion_mnist.py's fixed seeded subset) and seeds for every row. Rows: exhaustive
evaluation, the paper's staged schedule (its CIFAR-10 preset, 50/500 keep 5/1, and the faster 25/250
variant), and the elimination strategy at several error rates. For each: accuracy, mean and
95th-percentile NFE per image, and wall seconds per image. Also: images/s of the batched engine vs a
per-image loop of the same algorithm (one image at a time, batches of (class, timestep) pairs, as the
original code does), and the share of wall time spent in the network forward.
Writes benchmarks/results/efficiency.json and efficiency.png.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from common import RESULTS, test_subset, to_pixels

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, Staged, load_denoiser, preset
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.scoring import image_seed, noise_for
from diffusion_classifier.strategies import even_timesteps


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
    denoiser = load_denoiser(args.model)
    strategies = {"exhaustive 25": Exhaustive(25), "exhaustive 100": Exhaustive(100),
                  "staged 25/250 keep 5/1 (paper, fast)": Staged([25, 250], [5, 1], loss="l2"),
                  "staged cifar10 preset 50/500 keep 5/1": Staged(preset("cifar10").n_samples,
                                                                  preset("cifar10").to_keep, loss="l2")}
    for rate in args.error_rates:
        strategies[f"elimination error_rate={rate}"] = Elimination(error_rate=rate, max_timesteps=250)
    rows = []
    for name, strategy in strategies.items():
        if name in args.skip:
            continue
        clf = DiffusionClassifier(denoiser, strategy=strategy, loss="l2", batch_size=args.batch_size)
        row = {"strategy": name, "config": strategy.describe(), **run_strategy(clf, pixels, labels)}
        rows.append(row)
        print(f"{name:<42} acc {row['accuracy']:.4f}  NFE mean {row['nfe_mean']:7.1f}  p95 {row['nfe_p95']:7.1f}  "
              f"{row['seconds_per_image']:.3f} s/img", flush=True)
    out["strategies"] = rows
    plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        marker = {"exhaustive": "o", "staged": "s", "elimination": "^"}[row["config"]["name"]]
        ax.scatter(row["nfe_mean"], row["accuracy"], marker=marker)
        ax.annotate(row["strategy"], (row["nfe_mean"], row["accuracy"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel="mean NFE per image", ylabel="accuracy", title="accuracy vs cost")
    fig.tight_layout()
    fig.savefig(RESULTS / "efficiency.png", dpi=120)


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


def section_throughput(pixels, labels, args, out):
    denoiser = load_denoiser(args.model)
    n = args.throughput_timesteps
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(n), batch_size=args.batch_size, images_per_batch=64)
    started = time.perf_counter()
    results = clf.classify_pixels(pixels, [str(i) for i in range(len(pixels))])
    engine_wall = time.perf_counter() - started
    network_share = clf.engine.stats.network_seconds / engine_wall
    started = time.perf_counter()
    loop_predictions = per_image_loop(denoiser, pixels, n, args.loop_batch_size, clf.seed)
    loop_wall = time.perf_counter() - started
    agree = float(np.mean(np.array(loop_predictions) == np.array([r.prediction_index for r in results])))
    out["throughput"] = {"timesteps": n, "images": len(pixels), "engine_images_per_s": len(pixels) / engine_wall,
                         "loop_images_per_s": len(pixels) / loop_wall, "speedup": loop_wall / engine_wall,
                         "engine_batch_size": args.batch_size, "loop_batch_size": args.loop_batch_size,
                         "network_share_of_wall": network_share, "prediction_agreement": agree}
    t = out["throughput"]
    print(f"engine {t['engine_images_per_s']:.2f} img/s (batch {args.batch_size}), per-image loop "
          f"{t['loop_images_per_s']:.2f} img/s (batch {args.loop_batch_size}): {t['speedup']:.2f}x; "
          f"network forward {100 * network_share:.1f}% of engine wall time; predictions agree {100 * agree:.1f}%")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--model", default="fashion-mnist-class")
    parser.add_argument("--sections", nargs="+", default=["strategies", "throughput"])
    parser.add_argument("--error-rates", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    parser.add_argument("--skip", nargs="*", default=[], help="strategy row names to skip")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--loop-batch-size", type=int, default=32, help="the original code's default")
    parser.add_argument("--throughput-timesteps", type=int, default=25)
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
                                                   "date": time.strftime("%Y-%m-%d %H:%M"),
                                                   "threads": torch.get_num_threads()}
        RESULTS.mkdir(exist_ok=True)
        atomic_write_text(json.dumps(results, indent=2) + "\n", path)


if __name__ == "__main__":
    main()
