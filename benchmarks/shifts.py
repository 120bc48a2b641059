"""Distribution shifts on image batches in [-1, 1], shared by the benchmarks."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def gaussian_noise(x, sigma, seed=0):
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def contrast(x, factor):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def blur(x, sigma):
    radius = int(3 * sigma + 0.5)
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-grid**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.transpose(2, 3))


def rotate(x, degrees):
    angle = torch.tensor(degrees * np.pi / 180)
    theta = torch.tensor([[torch.cos(angle), -torch.sin(angle), 0], [torch.sin(angle), torch.cos(angle), 0]])
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1  # background stays black


def translate(x, pixels):
    out = torch.full_like(x, -1.0)
    out[..., pixels:, pixels:] = x[..., :-pixels, :-pixels]
    return out


def brightness(x, delta):
    return (x + delta).clamp(-1, 1)


def jpeg(x, quality):
    out = []
    for image in x:
        array = ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32)
        out.append(torch.from_numpy(decoded / 127.5 - 1)[None])
    return torch.stack(out)


# family -> [(severity label, function)]
FAMILIES = {
    "gaussian noise": [(f"sigma {s}", lambda x, s=s: gaussian_noise(x, s)) for s in (0.1, 0.2, 0.3)],
    "contrast": [(f"x{f}", lambda x, f=f: contrast(x, f)) for f in (0.7, 0.5, 0.3)],
    "brightness": [(f"{d:+}", lambda x, d=d: brightness(x, d)) for d in (0.2, 0.4, -0.2)],
    "blur": [(f"sigma {s}", lambda x, s=s: blur(x, s)) for s in (0.7, 1.0, 1.5)],
    "rotation": [(f"{d} deg", lambda x, d=d: rotate(x, d)) for d in (10, 20)],
    "translation": [(f"{p} px", lambda x, p=p: translate(x, p)) for p in (1, 2, 3)],
    "jpeg": [(f"quality {q}", lambda x, q=q: jpeg(x, q)) for q in (50, 20, 10)],
}
