"""Process-level plumbing: allocator tuning, atomic file writes, dtype/device parsing."""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError

_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Stop glibc from returning freed activation buffers to the OS after every layer.

    CPU convolutions allocate and free large buffers on every call; with the default
    malloc thresholds each one is a fresh mmap and page-faults anew. Raising the
    mmap/trim thresholds and the top pad keeps them in the heap (on this project's
    2-core machines it gave about 1.6x the UNet throughput, measured with
    benchmarks/). Same effect as MALLOC_MMAP_THRESHOLD_ etc., but works after start.

    It changes malloc for the whole process, so the library never calls it: the CLI does once at start,
    and so do the benchmarks; in your own program call it yourself if you want the speed.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = all(libc.mallopt(option, value) == 1 for option, value in (
        (m_mmap_threshold, 1 << 30), (m_trim_threshold, (1 << 31) - 1), (m_top_pad, 256 << 20)))
    _ALLOCATOR_TUNED = ok
    return ok


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(text: str, path: str | Path) -> None:
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj, path: str | Path) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(buffer.getvalue(), path)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# What --dtype auto picks on CUDA: bfloat16 ran the SD 2 UNet 3% faster than float16 on an H200 (402 vs 389
# forwards/s, batch 256) and cannot overflow where float16 can; see docs/results.md.
AUTO_CUDA_DTYPE = torch.bfloat16


def parse_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name; "auto": half precision (bfloat16) on CUDA, float32 elsewhere."""
    if name == "auto":
        return AUTO_CUDA_DTYPE if device is not None and torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose from auto, float32, float16, bfloat16")
    return DTYPES[name]


def parse_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available here")
    return device
