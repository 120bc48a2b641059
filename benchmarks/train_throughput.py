"""Training throughput of `train` (images/s) on this machine's CPU or GPU, for the class-small network on
Fashion-MNIST, at a few batch sizes.

    python -m benchmarks.train_throughput --device cpu --threads 2                # our 2-core machines
    python -m benchmarks.train_throughput --device cuda --precision bf16 --batch-sizes 1024 4096

Each batch size trains a fresh run for --seconds (time budget; the first steps, which warm up kernels and
allocators, are included) and reports images seen per second of training. Writes
benchmarks/results/train_throughput_DEVICE.json (or --out) and prints one line per batch size.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from diffusion_classifier.data import load_dataset
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.training.config import TrainConfig
from diffusion_classifier.training.trainer import Trainer

from .common import RESULTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--architecture", default="class-small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("fashion-mnist", "train")
    rows = []
    for batch in args.batch_sizes:
        config = TrainConfig(architecture=args.architecture, batch_size=batch, max_minutes=args.seconds / 60,
                             checkpoint_minutes=10**6, device=args.device, precision=args.precision)
        with tempfile.TemporaryDirectory() as out:
            trainer = Trainer(dataset, out, config)
            summary = trainer.run(progress=False)
        rows.append({"batch_size": batch, "steps": summary["steps"], "seconds": summary["train_seconds"],
                     "images_per_second": summary["images_seen"] / summary["train_seconds"]})
        print(f"batch {batch}: {rows[-1]['images_per_second']:.0f} images/s ({summary['steps']} steps in "
              f"{summary['train_seconds']:.0f} s)", flush=True)
    device = torch.device(args.device if args.device != "auto" else "cpu")
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
              "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__, "precision": args.precision,
              "architecture": args.architecture, "rows": rows, "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out) if args.out else RESULTS / f"train_throughput_{device.type}.json"
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)


if __name__ == "__main__":
    main()
