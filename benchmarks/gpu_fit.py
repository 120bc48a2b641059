"""Does each family fit the GPU at default settings, and how close is `estimate`? (For a GPU lease.)

    python -m benchmarks.gpu_fit                 # SDXL base and SD3.5 medium at full size: about 6 minutes on an H100
    python -m benchmarks.gpu_fit --tiny          # small configs, on the CPU: checks the script runs

For each family a pipeline with random weights is written at its published sizes (estimate_families' configs,
every component; stand-in tokenizers with the real lengths) to local disk on the machine itself. Then 8 random
images are classified against 10 prompts at default settings (--batch-size auto, --text-encoders auto, bf16,
exhaustive 25), once with the whole GPU and once capped at 24 GB (torch.cuda.set_per_process_memory_fraction),
each in a fresh process; the measured peak (torch.cuda.max_memory_allocated) is printed beside estimate's at
the batch size the run used. Writes benchmarks/results/gpu_fit.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from diffusion_classifier.runtime import atomic_write_text

from .common import RESULTS, child_process
from .estimate_families import FAMILIES, write_pipeline
from .gpu_throughput import TINY_UNET

CHOSEN = ("SDXL base (1024 px)", "SD3.5 medium (1024 px)")
LABELS = ["cat", "dog", "bird", "car", "tree", "house", "boat", "horse", "chair", "flower"]
CAP_GB = 24


def tiny_families() -> dict:
    """Small stand-ins with the same structure (CPU smoke run)."""
    from .estimate_families import SD_SCHEDULER, clip, vae

    small_vae = dict(vae(), block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                     up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, sample_size=32)
    return {"tiny SD": ("StableDiffusionPipeline", {
        "unet": ("diffusers", "UNet2DConditionModel", TINY_UNET), "vae": ("diffusers", "AutoencoderKL", small_vae),
        "text_encoder": ("transformers", "CLIPTextModel", dict(clip(32, 2, 2), intermediate_size=37)),
        "tokenizer": "clip", "scheduler": ("diffusers", "EulerDiscreteScheduler", SD_SCHEDULER)})}


def write_weights(folder: Path, device: torch.device) -> None:
    """Random weights for every model component of a configs-only pipeline, saved in bf16 (as the hub's fp16)."""
    from diffusion_classifier.adapters.loading import component_names, module_from_config, read_index

    index = read_index(folder)
    for name in component_names(index):
        library, class_name = index[name]
        import importlib

        cls = getattr(importlib.import_module(library), class_name)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue
        with torch.device(device):  # random initialisation of billions of parameters: on the GPU
            module = module_from_config(cls, folder / name, library).to(torch.bfloat16)
        module.save_pretrained(folder / name)
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()


def classify_once(folder: str, cap: float | None, device: str) -> None:
    """The measured child: classify 8 images at default settings; print batch size, peak and seconds."""
    import numpy as np
    from PIL import Image

    from diffusion_classifier import DiffusionClassifier

    where = torch.device(device)
    if cap and where.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap, where)
    started = time.perf_counter()
    clf = DiffusionClassifier.from_pretrained(folder, device=device, labels=LABELS)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(8)]
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    results = clf.classify(images)
    peak = torch.cuda.max_memory_allocated(where) / 2**30 if where.type == "cuda" else None
    print(json.dumps({"batch_size": clf.engine.batch_size, "peak_gib": peak, "nfe": sum(r.nfe for r in results),
                      "seconds": time.perf_counter() - started}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--workdir", default=None, help="where pipelines are written (default: a temporary folder)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        return classify_once(args.child, args.cap, device)

    from diffusion_classifier.adapters.estimate import estimate

    families = tiny_families() if args.tiny else {name: FAMILIES[name] for name in CHOSEN}
    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for k, (name, (pipeline, components)) in enumerate(families.items()):
            folder = write_pipeline(Path(tmp) / f"p{k}", pipeline, components)
            started = time.perf_counter()
            write_weights(folder, torch.device(device))
            print(f"{name}: wrote random weights in {time.perf_counter() - started:.0f} s", flush=True)
            caps = [None] + ([CAP_GB * 2**30 / total] if total and total > CAP_GB * 2**30 else [])
            for cap in caps:
                done = subprocess.run(**child_process(__spec__.name, "--child", str(folder),
                                                      *(["--cap", str(cap)] if cap else [])),
                                      capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                if done.returncode != 0 or not lines:
                    rows.append({"family": name, "cap_gb": CAP_GB if cap else None, "error":
                                 (done.stderr.strip().splitlines() or ["failed"])[-1][:300]})
                    print(f"  cap {CAP_GB if cap else '-'}: failed: {rows[-1]['error']}", flush=True)
                    continue
                measured = json.loads(lines[-1])
                predicted = estimate(folder, batch_size=measured["batch_size"], dtype="bfloat16").peak_gib
                rows.append({"family": name, "cap_gb": CAP_GB if cap else None, **measured,
                             "estimated_gib": predicted})
                shown = f"{measured['peak_gib']:.1f}" if measured["peak_gib"] is not None else "-"
                print(f"  cap {CAP_GB if cap else '-'} GB: batch {measured['batch_size']}, peak {shown} GiB, "
                      f"estimate {predicted:.1f} GiB, {measured['seconds']:.0f} s", flush=True)
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
              "tiny": args.tiny, "rows": rows}
    out = Path(args.out) if args.out else RESULTS / ("gpu_fit_tiny.json" if args.tiny else "gpu_fit.json")
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
