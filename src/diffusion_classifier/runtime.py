"""Process-level plumbing: allocator tuning, atomic file writes, dtype/device parsing, checking a compiled
network against eager."""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class CompileCheck:
    """What the first call of a compiled network gave, beside the eager network's answer to the same inputs."""

    compiled: torch.Tensor | None  # None when compiling failed
    eager: torch.Tensor
    seconds: float  # the compiling call
    failure: str | None  # why the compiled network is not to be used (None: it matches eager)


def check_compiled(compiled: Callable[[], torch.Tensor], eager: Callable[[], torch.Tensor], name: str, what: str,
                   tolerance: float) -> CompileCheck:
    """Run the call that compiles, then the eager one on the same inputs, and compare (relative norm of the
    difference). Compiling fails in many ways (no C compiler, an unsupported operation) and compilers have bugs
    (torch 2.13's CPU inductor drops the gradient through UNet2DModel's middle block), so the engine and the
    trainer both use a compiled network only after it has matched eager once; the caller warns and falls back
    on `failure`."""
    started = time.perf_counter()
    result, failure = None, None
    try:
        result = compiled()
        if result.device.type == "cuda":
            torch.cuda.synchronize(result.device)
    except Exception as exc:  # torch._dynamo / inductor raise many kinds
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        failure = f"compiling {name} failed ({reason})"
    seconds = time.perf_counter() - started
    reference = eager()
    if result is not None:
        difference = float((result - reference).norm() / reference.norm().clamp_min(1e-30))
        if not difference <= tolerance:
            failure = (f"the compiled {name}'s {what} differ from eager ones by {difference:.2g} (relative; at most "
                       f"{tolerance:g} expected)")
    return CompileCheck(result, reference, seconds, failure)
