"""How much memory scoring a model takes on a GPU, from its configs alone: no weights are fetched or allocated.

The pipeline's components are built from their config files under torch's FakeTensorMode (tensors with
shapes and dtypes but no storage) and put together by the model's own adapter; then one text embedding,
one VAE encoding and one scoring batch run through the library's own code (embed_conditions,
encode_images, error) while a dispatch mode adds up the bytes of the tensors alive at each moment. CPU
kernels stand in for CUDA ones (attention included: both keep only its output, not the attention matrix),
so allocator slack and CUDA workspaces are not counted. On the published configs this gives SD 2's UNet
17.9 GiB at batch 256 (measured on an H200: 18.0), 34.2 at 512 (34.3), SDXL's 14.7 at 64 (16.3),
SD3-medium's transformer 9.1 at 32 (10.4) and DiT-XL/2 3.1 at 256 (3.1); `benchmarks/estimate_check.py`.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UserError

GIB = 2**30
HEADROOM = 0.9  # of the given memory a batch may plan to use: the allocator's slack and CUDA's workspaces
PROMPT = "a photo of a cat sitting on a wooden table"


def parse_memory(text: str) -> int:
    """'24GB', '24GiB', '80G' or a number of GiB -> bytes (GB and GiB both read as GiB, as GPUs are sold)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib)?\s*", str(text).lower())
    if not match or float(match[1]) <= 0:
        raise UserError(f"--memory: {text!r} is not an amount of memory such as 24GB")
    return int(float(match[1]) * GIB)


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of tensor storages created under it while they are alive; `peak` is the most at once."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self._storages:
            return
        size = storage.nbytes()
        self._storages.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(key=key, size=size):
            self.live -= size
            self._storages.discard(key)

        weakref.finalize(storage, freed)

    def reset_peak(self) -> None:
        self.peak = self.live


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass
class Estimate:
    model: str
    dtype: str
    resolution: int
    batch_size: int
    components: list[dict] = field(default_factory=list)  # name, class, parameters, gib, where
    activation_gib_per_sample: float = 0.0
    activation_gib_fixed: float = 0.0
    vae_gib: float = 0.0  # the VAE's encoding of one chunk of images, above the weights
    embedding_gib: float = 0.0  # embedding one batch of prompts, above the weights
    embedding_on_gpu_gib: float = 0.0  # every weight plus that: what embedding on the GPU takes
    peak_gib: float = 0.0
    memory_gib: float | None = None
    max_batch_size: int | None = None  # 0: no batch fits (describe() says why)
    weights_on_gpu_gib: float = 0.0  # the weights that stay on the GPU while scoring
    embedding_phase_gib: float = 0.0  # what embedding takes on the GPU (0 where the encoders never go there)

    def max_batch(self, memory: int) -> int:
        """The largest batch whose scoring peak fits `memory` bytes (planning on HEADROOM of it); 0 if none does."""
        room = memory * HEADROOM - (self.weights_on_gpu_gib + self.activation_gib_fixed) * GIB
        if room <= 0 or self.embedding_phase_gib * GIB > memory:
            return 0
        return int(room // (self.activation_gib_per_sample * GIB))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _build_fake(model: str | Path, dtype: torch.dtype, variant: str | None):
    """The model's adapter over fake components (no storage), and its directory."""
    from . import loading

    directory = loading.resolve_model_dir(model, variant, skip_weights=True)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    denoiser = loading.load_pipeline(directory, dtype, variant, fake_mode=mode)  # schedulers and tokenizers are real
    with mode:
        denoiser.to(dtype=dtype)
    return denoiser, mode


def FakeTensorMode(**kwargs):  # noqa: N802  (torch's class, imported where it is used: it is private API)
    from torch._subclasses.fake_tensor import FakeTensorMode as Mode

    return Mode(**kwargs)


def _candidates(denoiser, n: int) -> list:
    return [PROMPT] * n if denoiser.conditioning == "text" else [0] * n


def _scoring_peak(denoiser, mode, batch: int, tracker: LiveBytes) -> int:
    """Bytes alive at the peak of one scoring batch of `batch` evaluations (inputs included)."""
    channels, height, width = denoiser.latent_shape
    with mode, torch.inference_mode():
        cond = denoiser.embed_conditions(_candidates(denoiser, 1))
        tracker.reset_peak()
        start = tracker.live
        rows = {key: value.expand(batch, *value.shape[1:]).contiguous() for key, value in cond.items()}
        x0 = torch.zeros(batch, channels, height, width, dtype=denoiser.dtype)
        noise = torch.zeros(batch, channels, height, width)
        t = torch.full((batch,), denoiser.num_train_timesteps // 2, dtype=torch.long)
        denoiser.error(x0, noise, t, rows)
        return tracker.peak - start


def estimate(model: str | Path, resolution: int | None = None, batch_size: int | None = None,
             dtype: str | torch.dtype = "bfloat16", memory: str | int | None = None, images_per_batch: int = 32,
             text_encoders: str = "auto", variant: str | None = "auto") -> Estimate:
    """GPU memory to score `model` (a built-in name, pipeline directory or hub id; only configs are read) at
    `batch_size` (default 256) network evaluations per pass, and the largest batch that fits `memory`."""
    from ..engine.scoring import DEFAULT_BATCH
    from ..runtime import parse_dtype
    from .hub import resolve_variant

    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    batch_size = DEFAULT_BATCH if batch_size in (None, "auto") else int(batch_size)
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    budget = None if memory is None else parse_memory(memory) if isinstance(memory, str) else int(memory)
    denoiser, mode = _build_fake(model, dtype, resolve_variant(variant, dtype))
    if resolution is not None:
        denoiser.set_resolution(resolution)
    tracker = LiveBytes()
    with tracker:
        on_gpu = _placement(denoiser, text_encoders)
        weights = sum(_module_bytes(m) for m, where in on_gpu if where == "gpu")
        # the prompts' embedding (encoders on the GPU while they embed, whatever their placement after)
        with mode, torch.inference_mode():
            start = tracker.live
            tracker.reset_peak()
            denoiser.embed_conditions(_candidates(denoiser, 8))
            embedding = tracker.peak - start
            encoders = sum(_module_bytes(m) for m, where in on_gpu if where != "gpu")
            # the VAE's encoding of one chunk of images
            vae = 0
            if denoiser.vae is not None:
                height, width = denoiser.image_size
                chunk = min(images_per_batch, denoiser.vae_chunk(height, width))
                tracker.reset_peak()
                start = tracker.live
                denoiser.encode_images(torch.zeros(chunk, denoiser.image_channels, height, width))
                vae = tracker.peak - start
        _scoring_peak(denoiser, mode, 1, tracker)  # the first call builds one-off things (position tables)
        two, four = (_scoring_peak(denoiser, mode, b, tracker) for b in (2, 4))
        per_sample = max((four - two) / 2, 1)
        fixed = max(two - 2 * per_sample, 0)
        at_batch = _scoring_peak(denoiser, mode, batch_size, tracker)
    result = Estimate(model=str(model), dtype=str(dtype).replace("torch.", ""), resolution=denoiser.resolution,
                      batch_size=batch_size, activation_gib_per_sample=per_sample / GIB,
                      activation_gib_fixed=fixed / GIB, vae_gib=vae / GIB, embedding_gib=embedding / GIB)
    for (name, _), (module, where) in zip(_named_modules(denoiser), on_gpu):
        result.components.append({"name": name, "class": type(module).__name__,
                                  "parameters": sum(p.numel() for p in module.parameters()),
                                  "gib": _module_bytes(module) / GIB, "where": where})
    scoring = weights + max(at_batch, vae)
    # with text encoders kept on the GPU they embed there; "auto" moves them there only where they fit (else they
    # embed on the CPU), and "cpu" never does, so only "gpu" makes the embedding a GPU peak
    embedding_phase = weights + encoders + embedding if text_encoders == "gpu" else 0
    result.embedding_on_gpu_gib = (weights + encoders + embedding) / GIB
    result.peak_gib = max(scoring, embedding_phase) / GIB
    result.weights_on_gpu_gib, result.embedding_phase_gib = weights / GIB, embedding_phase / GIB
    if budget is not None:
        result.memory_gib, result.max_batch_size = budget / GIB, result.max_batch(budget)
    return result


def _placement(denoiser, text_encoders: str) -> list[tuple[torch.nn.Module, str]]:
    """(module, where it lives while scoring) in component_names() order."""
    from .loading import TEXT_ENCODER_PLACES

    if text_encoders not in TEXT_ENCODER_PLACES:
        raise UserError(f"--text-encoders: choose {', '.join(TEXT_ENCODER_PLACES)}, not {text_encoders!r}")
    text = {id(m) for m in denoiser.text_modules()}
    return [(m, "gpu" if id(m) not in text or text_encoders == "gpu" else "cpu after embedding")
            for _, m in _named_modules(denoiser)]


def _named_modules(denoiser) -> list[tuple[str, torch.nn.Module]]:
    return [(name, part) for name, part in denoiser.components().items() if isinstance(part, torch.nn.Module)]


def describe(result: Estimate) -> list[str]:
    """The estimate as printed lines."""
    lines = [f"{result.model}: {result.resolution} px, {result.dtype}, batch {result.batch_size}"]
    for c in result.components:
        lines.append(f"  {c['name']:<16} {c['class']:<30} {c['parameters'] / 1e6:9.1f}M  {c['gib']:6.2f} GiB  "
                     f"{c['where']}")
    lines.append(f"  activations: {result.activation_gib_per_sample * 1024:.1f} MiB per sample + "
                 f"{result.activation_gib_fixed * 1024:.0f} MiB; VAE encoding {result.vae_gib:.2f} GiB; "
                 f"embedding {result.embedding_gib:.2f} GiB")
    lines.append(f"  peak: {result.peak_gib:.1f} GiB at batch {result.batch_size}")
    if result.memory_gib is not None:
        fits = (f"largest batch that fits: {result.max_batch_size}" if result.max_batch_size else
                "does not fit at any batch size (the weights alone, or the text encoders while embedding, "
                "exceed it): try --text-encoders cpu, a lower --resolution, or a larger GPU")
        lines.append(f"  {result.memory_gib:.0f} GiB: {fits}")
    return lines

