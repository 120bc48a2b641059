"""Equal GPU-minutes training and scoring on all 10,000 Fashion-MNIST test images (#24's science questions).

    python -m benchmarks.gpu_training --minutes 2.5 --out-dir $OUT     # a GPU machine
    python -m benchmarks.gpu_training --tiny --out-dir /tmp/smoke       # a CPU smoke test (the tests run it)

Sections, in order; one that would pass --budget-seconds is skipped and named in the JSON:
  ddpm   class-small trained with `train --device cuda --precision bf16` for --minutes (scoring the first
         --curve-images test images after each of --curve-minutes on the way: a learning curve), then every test image
         scored exhaustively on the 50-timestep grid (500 NFE, bf16); 250 / 100 NFE rows from column subsets
         of the same errors, elimination (error rate 0.05) replayed on a sample of them.
  cnn    the small CNN of benchmarks/common.py, trained on the GPU for --cnn-minutes without and with
         flips + shifts, its test accuracy every few seconds (a learning curve: where it saturates).
  flow   the same network trained with the rectified-flow objective for --minutes (the DDPM run is its
         control), scored the same way; velocity and ELBO rows follow exactly from its eps errors.
Paired differences on the same 10,000 images with standard errors. Writes gpu_training.json and each trained
model (the EMA pipeline, weights only) as MODEL.tar into --out-dir.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import DiffusionClassifier, Elimination, Exhaustive, load_denoiser
from diffusion_classifier.adapters.loading import weights_fingerprint
from diffusion_classifier.adapters.schedules import even_subset
from diffusion_classifier.data import LabelledImages, fashion_mnist_arrays, load_dataset
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.runtime import atomic_write_text
from diffusion_classifier.stats import paired_difference, standard_error
from diffusion_classifier.training.config import CAPTION_STATES, TrainConfig
from diffusion_classifier.training.trainer import Trainer

from .common import CNNTrainer, to_pixels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(correct: np.ndarray) -> dict:
    return {"accuracy": float(correct.mean()), "standard_error": standard_error(correct)}


def train_diffusion(objective: str, args, device, out: Path, train_set: LabelledImages, minutes: float) -> dict:
    """Train (or continue, from out/checkpoint.pt) for `minutes` more."""
    config = TrainConfig(conditioning="class", architecture=args.architecture, batch_size=args.batch_size,
                         lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                         max_minutes=minutes, checkpoint_minutes=10**6, objective=objective,
                         device=str(device), precision=args.precision)
    trainer = Trainer(train_set, out, config)
    trainer.resume()
    summary = trainer.run(progress=False)
    summary.pop("config")
    summary["images_per_second"] = summary["images_seen"] / max(summary["train_seconds"], 1e-9)
    return summary


def score_all(model_dir: Path, pixels: torch.Tensor, labels: np.ndarray, args, device,
              deadline: float) -> tuple[np.ndarray, dict]:
    """Errors [images, classes, grid] of the test images on the `args.grid`-timestep grid, and timing; stops
    after the chunk that passes `deadline` (then the first images only: the report says how many)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what --dtype auto picks
    clf = DiffusionClassifier(load_denoiser(model_dir, device=device, dtype=dtype), strategy=Exhaustive(args.grid),
                              batch_size=args.score_batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    errors, peaks, started = [], [], time.perf_counter()
    for start in range(0, len(pixels), args.images_per_chunk):
        results = clf.classify_pixels(pixels[start:start + args.images_per_chunk],
                                      [str(i) for i in range(start, start + args.images_per_chunk)])
        errors += [r.errors[:, 0, np.argsort(r.timesteps)] for r in results]  # columns in timestep order
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
        if time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - started
    errors = np.stack(errors)
    nfe = errors.shape[1] * errors.shape[2]
    return errors, {"seconds": seconds, "images": len(errors), "nfe_per_image": nfe,
                    "forwards_per_second": nfe * len(errors) / seconds, "dtype": str(dtype).replace("torch.", ""),
                    "peak_mib_per_chunk": peaks, "grid": clf.denoiser.schedule.grid(args.grid)}


def exhaustive_rows(errors: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """Accuracy at the full grid and at evenly spread column subsets (half and a fifth of the grid)."""
    n = errors.shape[2]
    rows = {}
    for k in (n, n // 2, n // 5):
        columns = even_subset(list(range(n)), k)
        chosen = errors[:, :, columns] * (1 if weights is None else weights[columns])
        correct = chosen.mean(axis=2).argmin(axis=1) == labels
        rows[f"{k * errors.shape[1]} NFE"] = {**rate(correct), "correct": correct}
    return rows


def elimination_row(errors: np.ndarray, labels: np.ndarray, grid: list[int], sample: int) -> dict:
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(errors), size=min(sample, len(errors)), replace=False))
    strategy = Elimination(error_rate=0.05, max_timesteps=len(grid))
    tables = [replay(strategy, errors[i][:, None, :], grid) for i in pick]
    correct = np.array([t.ranking()[0] for t in tables]) == labels[pick]
    return {**rate(correct), "nfe_mean": float(np.mean([t.nfe for t in tables])), "images": len(pick)}


def train_cnn(augmentation: bool, seconds: float, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor,
              test_y: np.ndarray, device, seed: int = 0) -> dict:
    """The CNN reference for `seconds`, with its test accuracy at every tenth of the budget."""
    trainer = CNNTrainer(x, y, augmentation, device, seed)
    curve = []
    for _ in range(10):
        trainer.train_for(seconds / 10)
        curve.append({"seconds": round(trainer.seconds, 1), "steps": trainer.steps,
                      "accuracy": float(trainer.correct(test_x, test_y).mean())})
    correct = trainer.correct(test_x, test_y)
    return {"augmentation": "flips+shifts" if augmentation else "none", "seconds": seconds, "steps": trainer.steps,
            "epochs": trainer.epochs, **rate(correct), "curve": curve, "correct": correct}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Paired difference of two correctness vectors on the test images both scored (a common prefix)."""
    n = min(len(a), len(b))
    difference, stderr = paired_difference(a[:n], b[:n])
    return {"difference": difference, "standard_error": stderr, "images": n}


def pack(model_dir: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as tar:
        for item in sorted(model_dir.iterdir()):
            if item.name not in ("checkpoint.pt", CAPTION_STATES) and not item.name.startswith("."):
                tar.add(item, arcname=f"{model_dir.name}/{item.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: seconds of training, 40 test images")
    parser.add_argument("--minutes", type=float, default=2.5, help="training budget of each diffusion model")
    parser.add_argument("--cnn-minutes", type=float, default=0.5, help="training budget of each CNN")
    parser.add_argument("--curve-minutes", type=float, nargs="*", default=[],
                        help="also score the diffusion models after these many minutes of their training")
    parser.add_argument("--curve-images", type=int, default=2000, help="test images scored at each curve point")
    parser.add_argument("--sections", nargs="+", default=["cnn", "ddpm", "flow"], choices=["ddpm", "cnn", "flow"])
    parser.add_argument("--architecture", default="class-small")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--grid", type=int, default=50, help="timesteps per class when scoring")
    parser.add_argument("--score-batch", type=int, default=8192)
    parser.add_argument("--images-per-chunk", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--elimination-sample", type=int, default=1000)
    parser.add_argument("--budget-seconds", type=float, default=360)
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    if args.tiny:
        args.minutes, args.cnn_minutes, args.architecture = 0.02, 0.01, "class-tiny"
        args.batch_size, args.warmup_steps, args.grid = 64, 5, 10
        args.score_batch, args.images_per_chunk, args.test_images, args.elimination_sample = 256, 20, 20, 10
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_set = load_dataset("fashion-mnist", "train")
    if args.tiny:
        train_set = train_set.subset(range(2000))
    images, labels = fashion_mnist_arrays("train")  # the CNN's training data, as arrays
    test_images, test_labels = fashion_mnist_arrays("test")
    test_images, test_labels = test_images[:args.test_images], test_labels[:args.test_images]
    test_pixels = to_pixels(test_images)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny, "settings": {k: v for k, v in vars(args).items()
                                                                         if k != "out_dir"},
              "test_images": len(test_labels), "sections": {}, "skipped": [], "paired": {}}
    correct: dict[str, np.ndarray] = {}

    def save():
        result["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(json.dumps(result, indent=2, default=lambda o: None) + "\n", out / "gpu_training.json")

    def fits(seconds: float, name: str) -> bool:
        if time.perf_counter() - started + seconds > args.budget_seconds:
            result["skipped"].append(f"{name} (would pass the {args.budget_seconds:.0f} s budget)")
            save()
            return False
        return True

    score_estimate = 60 if device.type == "cuda" else 30  # seconds to score the test images
    for section in args.sections:
        if section in ("ddpm", "flow"):
            points = sorted(m for m in set(args.curve_minutes) if 0 < m < args.minutes)
            if not fits(args.minutes * 60 + score_estimate * (1 + 0.2 * len(points)), section):
                continue
            run_dir = out / f"train-{section}"
            curve, trained = [], 0.0
            for minutes in points:  # the same run, scored on the way (the EMA export at that point)
                summary = train_diffusion(section, args, device, run_dir, train_set, minutes - trained)
                trained = minutes
                n = min(args.curve_images, len(test_labels))
                errors, timing = score_all(run_dir, test_pixels[:n], test_labels[:n], args, device,
                                           deadline=started + args.budget_seconds - 5)
                point = exhaustive_rows(errors, test_labels[:len(errors)])[f"{errors.shape[1] * errors.shape[2]} NFE"]
                point.pop("correct")
                curve.append({"minutes": minutes, "epochs": summary["epochs"], "images": len(errors), **point})
                print(f"{section} after {minutes:g} min ({summary['epochs']:.1f} epochs): "
                      f"{100 * point['accuracy']:.2f}% on {len(errors)} test images", flush=True)
            summary = train_diffusion(section, args, device, run_dir, train_set, args.minutes - trained)
            pack(run_dir, out / f"{section}.tar")
            entry = result["sections"][section] = {"training": summary, "curve": curve,
                                                   "model_weights_sha256": weights_fingerprint(run_dir)}
            save()  # the trained model and its summary survive a scoring that runs out of time
            errors, timing = score_all(run_dir, test_pixels, test_labels, args, device,
                                       deadline=started + args.budget_seconds - 5)
            scored = test_labels[:len(errors)]
            rows = exhaustive_rows(errors, scored)
            entry["scoring"] = timing
            if section == "flow":
                from diffusion_classifier.adapters.schedules import RectifiedFlowSchedule

                schedule = RectifiedFlowSchedule(1000)
                grid = torch.tensor(timing["grid"])
                sigma = schedule.sigmas[grid].numpy()
                entry["velocity"] = exhaustive_rows(errors / (1 - sigma) ** 2, scored)
                entry["elbo"] = exhaustive_rows(errors, scored, schedule.elbo_weights()[grid].numpy())
                for kind in ("velocity", "elbo"):
                    for nfe, row in entry[kind].items():
                        correct[f"flow {kind} {nfe}"] = row.pop("correct")
            entry["exhaustive"] = rows
            for nfe, row in rows.items():
                correct[f"{section} {nfe}"] = row.pop("correct")
            entry["elimination"] = elimination_row(errors, scored, timing["grid"], args.elimination_sample)
        elif section == "cnn":
            if not fits(2 * args.cnn_minutes * 60 + 10, section):
                continue
            x = to_pixels(images).to(device)
            y = torch.from_numpy(labels).long().to(device)
            test_x = test_pixels.to(device)
            rows = []
            for augmentation in (False, True):
                row = train_cnn(augmentation, args.cnn_minutes * 60, x, y, test_x, test_labels, device)
                correct[f"cnn {row['augmentation']}"] = row.pop("correct")
                rows.append(row)
            result["sections"]["cnn"] = rows
        result["paired"] = {f"{a} minus {b}": paired(correct[a], correct[b]) for a in correct for b in correct
                            if a < b}
        # per-image correctness, so later runs (another lease, another model) can be compared paired
        result["correct"] = {name: "".join("1" if c else "0" for c in v) for name, v in correct.items()}
        save()
    save()
    for name, c in correct.items():
        print(f"{name:34s} {100 * c.mean():6.2f}% +- {100 * standard_error(c):.2f}")
    print(f"{result['seconds']:.0f} s; skipped: {', '.join(result['skipped']) or 'nothing'}")


if __name__ == "__main__":
    main()
