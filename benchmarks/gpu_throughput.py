"""Scoring throughput on a GPU: our engine against the forward ceiling and against a per-image loop written
from the original method's description, on real-size random-weight networks built from the published
configs (no downloads).

    python -m benchmarks.gpu_throughput                      # an H200: about 5 minutes
    python -m benchmarks.gpu_throughput --tiny               # small configs on the CPU (the test suite runs it)

Rows, for SD 2 base's UNet (865.9M parameters, 64 x 64 latents, 10 classes, the CIFAR-10 preset's staged
schedule: 50 timesteps for all classes, keep 5, 500 for those: 2,750 NFE per image):
  * forward ceiling: the network alone on random inputs, eager at several batch sizes and compiled at one;
  * per-image loop: one image at a time as in the original code: for each stage, its (timestep, prompt)
    pairs in batches of 32, x_t built from a per-image noise tensor, fp16, text embeddings precomputed,
    errors copied back to the host after every batch, then the top-k of the mean errors;
  * our engine at default settings (--dtype auto = bf16, batch 256) and with --compile, same schedule.
Then the forward ceiling of DiT-XL/2-256, the SDXL UNet and SD3-medium's transformer, and our engine on
DiT (100 classes x 25 timesteps). Peak GPU memory per row. Writes benchmarks/results/gpu_throughput.json
(or --out) and prints one table. Sections that would pass --budget-seconds are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_classifier.adapters.dit import DiTDenoiser
from diffusion_classifier.adapters.text_unet import TextUNetDenoiser
from diffusion_classifier.engine.scoring import Job, ScoringEngine
from diffusion_classifier.engine.strategies import Exhaustive, Staged
from diffusion_classifier.runtime import atomic_write_text

from .common import RESULTS

# Published configs (the hub repos' unet/ and transformer/ config.json), trimmed to the keys diffusers needs.
SD2_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], attention_head_dim=[5, 10, 20, 20],
                cross_attention_dim=1024, use_linear_projection=True,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280],
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                 attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                sample_size=16, patch_size=2, num_embeds_ada_norm=100, norm_num_groups=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build(cls_name: str, config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: billions of CPU random draws take minutes
        network = getattr(diffusers, cls_name)(**config)
    return network.to(dtype).eval().requires_grad_(False)


def sd_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def dynamo_counters() -> dict:
    """How many graphs torch.compile captured so far (a recompile shows up as another unique graph)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {"dynamo_unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "dynamo_calls_captured": int(counters["stats"].get("calls_captured", 0))}


def forward_rate(call, batch: int, device: torch.device, seconds: float, warmup: int = 2) -> float:
    """Forwards per second of call(batch) over about `seconds` (after warm-up calls)."""
    with torch.inference_mode():
        for _ in range(warmup):
            call(batch)
        sync(device)
        calls, started = 0, time.perf_counter()
        while True:
            call(batch)
            calls += 1
            if calls >= 2:
                sync(device)
                if time.perf_counter() - started >= seconds:
                    break
        return calls * batch / (time.perf_counter() - started)


def unet_call(network, latent: int, channels: int, context: int, width: int, device, dtype, extra=None):
    def call(batch: int):
        x = torch.randn(batch, channels, latent, latent, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), device=device)
        states = torch.randn(batch, context, width, device=device, dtype=dtype)
        kwargs = extra(batch) if extra else {}
        # the keyword arguments the adapter passes, so a compiled graph is reused rather than recompiled
        return network(x, t, encoder_hidden_states=states, encoder_attention_mask=None, **kwargs).sample
    return call


def per_image_loop(network, scheduler, latents: torch.Tensor, text: torch.Tensor, stages: list[list[int]],
                   keep: list[int], batch_size: int = 32) -> list[int]:
    """The original method, one image at a time (fp16 network): for each stage, evaluate every remaining
    prompt at the stage's timesteps in batches of (t, prompt) pairs, copying errors back after every
    batch, then keep the best prompts by mean error."""
    device = latents.device
    abar = scheduler.alphas_cumprod.to(device)
    predictions = []
    for latent in latents:
        n_timesteps = sum(len(s) for s in stages)
        noise = torch.randn(n_timesteps, *latent.shape, device=device, dtype=latent.dtype)
        position = {t: i for i, t in enumerate(t for s in stages for t in s)}
        errors: dict[int, list[float]] = {c: [] for c in range(len(text))}
        remaining = list(range(len(text)))
        for stage, k in zip(stages, keep):
            pairs = [(t, c) for c in remaining for t in stage]
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                ts = torch.tensor([t for t, _ in chunk], device=device)
                eps = noise[[position[t] for t, _ in chunk]]
                a = abar[ts].view(-1, 1, 1, 1)
                x_t = (a.sqrt() * latent + (1 - a).sqrt() * eps).to(latent.dtype)
                with torch.inference_mode():
                    pred = network(x_t, ts, encoder_hidden_states=text[[c for _, c in chunk]]).sample
                error = F.mse_loss(pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3)).cpu()
                for (_, c), e in zip(chunk, error.tolist()):
                    errors[c].append(e)
            remaining = sorted(remaining, key=lambda c: np.mean(errors[c]))[:k]
        predictions.append(remaining[0])
    return predictions


def engine_run(denoiser, conditions, latents, strategy, batch_size: int, compile: bool, rows: np.ndarray):
    engine = ScoringEngine(denoiser, conditions, batch_size=batch_size, compile=compile)
    jobs = [Job(x0, noise_key=i, rows=rows) for i, x0 in enumerate(latents)]
    started = time.perf_counter()
    tables = engine.score(jobs, strategy)
    sync(denoiser.device)
    seconds = time.perf_counter() - started
    return engine, tables, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small configs on the CPU (a smoke test)")
    parser.add_argument("--images", type=int, default=4, help="images per scoring row")
    parser.add_argument("--budget-seconds", type=float, default=330, help="skip sections that would pass this")
    parser.add_argument("--seconds-per-rate", type=float, default=3.0, help="timing window of a forward rate")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="include compiled rows (default: on CUDA only)")
    parser.add_argument("--out", default=str(RESULTS / "gpu_throughput.json"))
    args = parser.parse_args()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notice on every .to(dtype)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    compile_rows = args.compile if args.compile is not None else device.type == "cuda"
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32  # what --dtype auto picks
    fp16 = torch.float16 if device.type == "cuda" else torch.float32
    unet_cfg, dit_cfg = (TINY_UNET, TINY_DIT) if args.tiny else (SD2_UNET, DIT_XL_2_256)
    latent, width = unet_cfg["sample_size"], unet_cfg["cross_attention_dim"]
    batches = [8, 16] if args.tiny else [256, 512]
    engine_batch = 16 if args.tiny else 256
    n_classes = 10
    staged = Staged([4, 10], [2, 1]) if args.tiny else Staged([50, 500], [5, 1])  # the CIFAR-10 preset
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or "cpu", "torch": torch.__version__, "tiny": args.tiny, "images": args.images,
                    "classes": n_classes, "staged": staged.describe(), "rows": [], "skipped": []}
    rows = result["rows"]
    sd2, dit_name = ("tiny-unet", "tiny-dit") if args.tiny else ("sd2-unet", "dit-xl-2-256")
    half, loop_half = str(bf16).replace("torch.", ""), str(fp16).replace("torch.", "")

    def left() -> float:
        return args.budget_seconds - (time.perf_counter() - started)

    def record(**row):
        rows.append(row)
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        atomic_write_text(json.dumps(result, indent=2) + "\n", Path(args.out))  # partial results survive a kill

    # ----- SD 2 base UNet ----------------------------------------------------------------------------
    network = build("UNet2DConditionModel", unet_cfg, device, bf16)
    params = sum(p.numel() for p in network.parameters()) / 1e6
    call = unet_call(network, latent, 4, 77, width, device, bf16)
    for b in batches:
        reset_peak(device)
        record(model=sd2, what=f"forward eager {half}", batch=b, forwards_per_s=forward_rate(
            call, b, device, args.seconds_per_rate), params_m=params, peak_gib=peak_memory(device))
    best_eager = max(r["forwards_per_s"] for r in rows if r["what"] == f"forward eager {half}")

    scheduler = sd_scheduler()
    denoiser = TextUNetDenoiser(network, scheduler)
    text = torch.randn(n_classes, 77, width, device=device, dtype=bf16)
    class_rows = np.arange(n_classes).reshape(-1, 1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.images, 4, latent, latent, generator=generator).to(device, bf16)
    stages = staged.stage_timesteps(denoiser.schedule)
    nfe = staged.expected_nfe(n_classes, denoiser.schedule)
    result["nfe_per_image"] = nfe

    # the per-image loop in fp16, as the original code runs
    network.to(fp16)
    reset_peak(device)
    loop_started = time.perf_counter()
    per_image_loop(network, scheduler, latents.to(fp16), text.to(fp16), stages, staged.to_keep)
    sync(device)
    loop_seconds = time.perf_counter() - loop_started
    record(model=sd2, what=f"per-image loop {loop_half}", batch=32, forwards_per_s=nfe * args.images / loop_seconds,
           seconds_per_image=loop_seconds / args.images, peak_gib=peak_memory(device))
    loop_rate = rows[-1]["forwards_per_s"]
    network.to(bf16)

    reset_peak(device)
    engine, tables, seconds = engine_run(denoiser, {"encoder_hidden_states": text}, latents, staged, engine_batch,
                                         False, class_rows)
    assert all(t.nfe == nfe for t in tables), "the engine's NFE differs from the schedule's"
    record(model=sd2, what=f"engine default ({half})", batch=engine_batch,
           forwards_per_s=nfe * args.images / seconds, seconds_per_image=seconds / args.images,
           vs_ceiling=nfe * args.images / seconds / best_eager, vs_loop=nfe * args.images / seconds / loop_rate,
           peak_gib=peak_memory(device))

    if compile_rows:
        if left() < 110:  # compiling the SD 2 UNet took 84 s on an H200
            result["skipped"].append("sd2 compiled rows (time budget)")
        else:
            reset_peak(device)
            engine, tables, seconds = engine_run(denoiser, {"encoder_hidden_states": text}, latents, staged,
                                                 engine_batch, True, class_rows)
            compile_seconds = engine.stats.compile_seconds
            rate = nfe * args.images / (seconds - compile_seconds)
            record(model=sd2, what=f"engine --compile ({half})", batch=engine_batch, forwards_per_s=rate,
                   seconds_per_image=(seconds - compile_seconds) / args.images, compile_seconds=compile_seconds,
                   vs_loop=rate / loop_rate, compiled=denoiser.compiled, peak_gib=peak_memory(device),
                   **dynamo_counters())
            if denoiser.compiled and left() > 30:  # steady state: the same compiled graph, a second pass
                engine, tables, seconds = engine_run(denoiser, {"encoder_hidden_states": text}, latents, staged,
                                                     engine_batch, True, class_rows)
                rate = nfe * args.images / seconds
                record(model=sd2, what=f"engine --compile ({half}), second pass", batch=engine_batch,
                       forwards_per_s=rate, seconds_per_image=seconds / args.images, vs_loop=rate / loop_rate,
                       peak_gib=peak_memory(device), **dynamo_counters())
            if denoiser.compiled:  # the same compiled graph, alone: the compiled ceiling at the engine's batch
                record(model=sd2, what=f"forward compiled {half}", batch=engine_batch,
                       forwards_per_s=forward_rate(call, engine_batch, device, args.seconds_per_rate),
                       peak_gib=peak_memory(device))
                denoiser.uncompile()
    del network, denoiser, engine, call
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ----- DiT-XL/2: forward ceiling and the engine on 100 classes x 25 timesteps --------------------------
    if left() < 40:
        result["skipped"].append("dit (time budget)")
    else:
        from diffusers import DDPMScheduler

        dit = build("DiTTransformer2DModel", dit_cfg, device, bf16)
        size = dit_cfg["sample_size"]

        def dit_call(batch: int):
            x = torch.randn(batch, 4, size, size, device=device, dtype=bf16)
            t = torch.randint(0, 1000, (batch,), device=device)
            y = torch.randint(0, dit_cfg["num_embeds_ada_norm"], (batch,), device=device)
            return dit(x, timestep=t, class_labels=y).sample

        reset_peak(device)
        best = batches[-2]
        dit_rate = forward_rate(dit_call, best, device, args.seconds_per_rate)
        record(model=dit_name, what=f"forward eager {half}", batch=best, forwards_per_s=dit_rate,
               params_m=sum(p.numel() for p in dit.parameters()) / 1e6, peak_gib=peak_memory(device))
        denoiser = DiTDenoiser(dit, DDPMScheduler(), info={"class_names": [str(i) for i in range(1000)]})
        classes = 100 if not args.tiny else 10
        ids = torch.arange(classes, device=device)
        dit_latents = torch.randn(args.images, 4, size, size, generator=generator).to(device, bf16)
        reset_peak(device)
        _, tables, seconds = engine_run(denoiser, {"class_labels": ids}, dit_latents, Exhaustive(25), engine_batch,
                                        False, np.arange(classes).reshape(-1, 1))
        rate = sum(t.nfe for t in tables) / seconds
        record(model=dit_name, what=f"engine default ({half}), {classes} classes x 25", batch=engine_batch,
               forwards_per_s=rate, vs_ceiling=rate / dit_rate, peak_gib=peak_memory(device))
        del dit, denoiser
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- SDXL UNet and SD3-medium transformer: forward ceilings -----------------------------------------
    if not args.tiny:
        if left() < 25:
            result["skipped"].append("sdxl forward (time budget)")
        else:
            sdxl = build("UNet2DConditionModel", SDXL_UNET, device, bf16)

            def extra(b: int) -> dict:
                return {"added_cond_kwargs": {"text_embeds": torch.randn(b, 1280, device=device, dtype=bf16),
                                              "time_ids": torch.randn(b, 6, device=device, dtype=bf16)}}

            reset_peak(device)
            record(model="sdxl-unet", what="forward eager bf16", batch=64, forwards_per_s=forward_rate(
                unet_call(sdxl, 128, 4, 77, 2048, device, bf16, extra), 64, device, args.seconds_per_rate),
                params_m=sum(p.numel() for p in sdxl.parameters()) / 1e6, peak_gib=peak_memory(device))
            del sdxl
            torch.cuda.empty_cache()
        if left() < 25:
            result["skipped"].append("sd3 forward (time budget)")
        else:
            sd3 = build("SD3Transformer2DModel", SD3_MEDIUM, device, bf16)

            def sd3_call(batch: int):
                return sd3(hidden_states=torch.randn(batch, 16, 128, 128, device=device, dtype=bf16),
                           encoder_hidden_states=torch.randn(batch, 333, 4096, device=device, dtype=bf16),
                           pooled_projections=torch.randn(batch, 2048, device=device, dtype=bf16),
                           timestep=torch.rand(batch, device=device) * 1000).sample

            reset_peak(device)
            record(model="sd3-medium-transformer", what="forward eager bf16", batch=32, forwards_per_s=forward_rate(
                sd3_call, 32, device, args.seconds_per_rate),
                params_m=sum(p.numel() for p in sd3.parameters()) / 1e6, peak_gib=peak_memory(device))
            del sd3

    result["seconds"] = time.perf_counter() - started
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_text(json.dumps(result, indent=2) + "\n", Path(args.out))
    print(f"\n{'model':24s} {'what':44s} {'batch':>5s} {'forwards/s':>11s} {'vs ceiling':>10s} {'vs loop':>8s} "
          f"{'peak GiB':>8s}")
    for r in rows:
        def cell(key, fmt, r=r):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{r['model']:24s} {r['what']:44s} {r['batch']:5d} {r['forwards_per_s']:11.1f} "
              f"{cell('vs_ceiling', '10.3f')} {cell('vs_loop', '8.3f')} {cell('peak_gib', '8.1f')}")
    print(f"NFE per image (staged {staged.n_samples} keep {staged.to_keep}, {n_classes} classes): {nfe}; "
          f"{result['seconds']:.0f} s in all; skipped: {', '.join(result['skipped']) or 'nothing'}")


if __name__ == "__main__":
    main()
