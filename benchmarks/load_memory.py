"""Peak host memory while loading a real-size checkpoint, against its weights in the scoring dtype.

    python -m benchmarks.load_memory                  # SDXL's UNet (2.57B parameters): about 5 minutes, 16 GB of disk
    python -m benchmarks.load_memory --tiny           # a small UNet (the test suite runs it)

Writes SDXL base's UNet with random weights (the published config, gpu_throughput.SDXL_UNET) as the hub has it:
diffusion_pytorch_model.safetensors in float32 and the fp16 variant, into --workdir. Then, each in a fresh
process, loads it the way the library does (loading.load_component: from_pretrained in the scoring dtype) and the
way it did before (float32, then cast: what loading a half-precision file such as Flux's bf16 transformer cost),
sampling the process's resident set (RSS, psutil, every 20 ms) and
reading its peak (VmHWM). Reported, over the weights' size in the scoring dtype: the peak of private
(anonymous) memory above what the process held before loading, which is what a machine must have free; and
the peak of all resident memory, which also counts the checkpoint's memory-mapped file pages (page cache:
shared between processes loading the same file, and dropped by the kernel under memory pressure).
Prints a table and writes benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import torch

from diffusion_classifier.runtime import atomic_write_text

from .common import RESULTS, child_process
from .gpu_throughput import SDXL_UNET, TINY_UNET

CASES = [  # (name, file variant, scoring dtype, how)
    ("bf16 from the fp16 variant (default on CUDA)", "fp16", "bfloat16", "library"),
    ("bf16 from the float32 file (--variant none)", None, "bfloat16", "library"),
    ("float32 from the float32 file (the CPU default)", None, "float32", "library"),
    ("before: the fp16 file loaded in float32, then cast to bf16", "fp16", "bfloat16", "float32-then-cast"),
]


def write_checkpoint(folder: Path, config: dict) -> int:
    """The UNet with random weights, saved in float32 and as the fp16 variant; its parameter count."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to_empty(device="cpu")
    for param in unet.parameters():  # random, in place: initialising 2.6B parameters the usual way takes minutes
        param.data.normal_(0, 0.02)
    for buffer in unet.buffers():
        buffer.zero_()
    unet.save_pretrained(folder, safe_serialization=True)
    unet.half().save_pretrained(folder, variant="fp16", safe_serialization=True)
    return sum(p.numel() for p in unet.parameters())


def load_once(folder: Path, variant: str | None, dtype_name: str, how: str) -> None:
    """The measured child: report RSS before loading (every library imported), then load."""
    from diffusers import UNet2DConditionModel  # noqa: F401  (imported before the baseline is read)

    from diffusion_classifier.adapters.denoiser import cast_module
    from diffusion_classifier.adapters.loading import load_component

    dtype = getattr(torch, dtype_name)
    before = psutil.Process().memory_info().rss
    print(json.dumps({"rss_before": before}), flush=True)
    time.sleep(0.2)  # the parent reads the baseline
    if how == "library":
        unet = load_component(folder, "diffusers", "UNet2DConditionModel", "unet", dtype, variant)
    else:
        unet = load_component(folder, "diffusers", "UNet2DConditionModel", "unet", None, variant)
        cast_module(unet, dtype)
    assert {p.dtype for p in unet.parameters()} == {dtype}
    for param in unet.parameters():  # touch every weight, as scoring will: memory-mapped ones become resident
        param.data.float().sum()
    status = Path("/proc/self/status").read_text()
    hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"vm_hwm": hwm, "params": sum(p.numel() for p in unet.parameters())}), flush=True)


def _rss(pid: int) -> tuple[int, int]:
    """(private anonymous, file-backed) resident bytes of a process (/proc/PID/status RssAnon, RssFile)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"]


def measure(folder: Path, variant: str | None, dtype_name: str, how: str) -> dict:
    child = child_process(__spec__.name, "--child", str(folder), "--child-variant", variant or "none",
                          "--child-dtype", dtype_name, "--child-how", how)
    started = time.perf_counter()
    proc = psutil.Popen(child["args"], env=child["env"], stdout=subprocess.PIPE, text=True)
    json.loads(proc.stdout.readline())  # the child has imported everything and starts loading
    anon_before, file_before = _rss(proc.pid)
    peak_total = peak_anon = 0
    while proc.poll() is None:
        try:
            anon, file = _rss(proc.pid)
        except (FileNotFoundError, KeyError, ProcessLookupError):
            break
        peak_total, peak_anon = max(peak_total, anon + file), max(peak_anon, anon)
        time.sleep(0.02)
    rest = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    proc.wait()
    if proc.returncode != 0 or not rest:
        raise SystemExit(f"loading failed ({proc.returncode}): {' '.join(child['args'])}")
    params = rest[-1]["params"]
    weights = params * torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()
    private = peak_anon - anon_before
    total = max(peak_total, rest[-1]["vm_hwm"]) - anon_before - file_before
    return {"params": params, "weights_gib": weights / 2**30, "private_gib": private / 2**30,
            "private_ratio": private / weights, "rss_gib": total / 2**30, "rss_ratio": total / weights,
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a small UNet instead of SDXL's")
    parser.add_argument("--workdir", default="/tmp/load_memory", help="where the checkpoint is written (16 GB)")
    parser.add_argument("--out", default=None, help="result JSON (default benchmarks/results/load_memory.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-variant", help=argparse.SUPPRESS)
    parser.add_argument("--child-dtype", help=argparse.SUPPRESS)
    parser.add_argument("--child-how", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant = None if args.child_variant == "none" else args.child_variant
        return load_once(Path(args.child), variant, args.child_dtype, args.child_how)

    folder = Path(args.workdir) / ("tiny" if args.tiny else "sdxl") / "unet"
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    params = write_checkpoint(folder, TINY_UNET if args.tiny else SDXL_UNET)
    print(f"wrote {params / 1e9:.3f}B parameters to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for name, variant, dtype_name, how in CASES:
        row = {"case": name, "file": "fp16 variant" if variant else "float32", "dtype": dtype_name, "how": how,
               **measure(folder, variant, dtype_name, how)}
        rows.append(row)
        print(f"{name:<50} weights {row['weights_gib']:6.2f} GiB  private {row['private_gib']:6.2f} GiB "
              f"({row['private_ratio']:.2f}x)  RSS {row['rss_gib']:6.2f} GiB ({row['rss_ratio']:.2f}x)  "
              f"({row['seconds']:.0f} s)", flush=True)
    shutil.rmtree(folder.parent)
    result = {"model": "tiny UNet" if args.tiny else "SDXL base UNet (random weights, published config)",
              "params": params, "machine": platform.machine(), "cpus": psutil.cpu_count(),
              "torch": torch.__version__, "rows": rows,
              "method": "a fresh process's resident memory, sampled every 20 ms from /proc (RssAnon: private memory; "
                        "RssAnon + RssFile, and VmHWM: all resident memory, the checkpoint's memory-mapped pages "
                        "included) minus what it held before loading, over the weights' size in the scoring "
                        "dtype"}
    out = Path(args.out) if args.out else RESULTS / ("load_memory_tiny.json" if args.tiny else "load_memory.json")
    atomic_write_text(json.dumps(result, indent=2) + "\n", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
