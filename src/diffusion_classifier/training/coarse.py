"""Coarse classes learned for a trained class-conditional model whose network stays frozen.

A coarse candidate ("a bag third", a WordNet parent) lets a cascade prune many classes with one evaluation, but
only if the model knows it. A class-conditional UNet adds a learned row of its class embedding to the timestep
embedding, so a new class is one new row: `learn_coarse_classes` fits one per coarse label, by the denoising loss
on images of the label's member classes, with every weight of the network and every existing row fixed (as
textual inversion fits a word). The fine classes' noise predictions are unchanged bit for bit, so exhaustive runs
scored with the base model stay valid for the extended one; what a poorly learned row costs is NFE, never the
cascade's promise (its gaps are calibrated on whatever the coarse candidates score).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..adapters.class_unet import ClassUNetDenoiser
from ..data import LabelledImages, preprocess
from ..errors import UserError
from ..runtime import atomic_write_text
from . import triples

FAMILIES_FILE = "coarse_families.json"


class _ExtendedEmbedding(torch.nn.Module):
    """The frozen class table with trainable rows appended."""

    def __init__(self, frozen: torch.Tensor, new: torch.Tensor):
        super().__init__()
        self.register_buffer("frozen", frozen)
        self.new = torch.nn.Parameter(new)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.frozen, self.new])[ids]


def coarse_groups(families: list[dict], class_names: list[str]) -> tuple[list[str], list[list[int]]]:
    """(the coarse labels in order of first appearance, each one's member class ids)."""
    index = {name: i for i, name in enumerate(class_names)}
    labels, members = [], []
    for family in families:
        for label, names in family.items():
            if label in index:
                raise UserError(f"coarse label {label!r} is already a class of the model")
            unknown = [n for n in names if n not in index]
            if unknown:
                raise UserError(f"coarse group {label!r} holds {unknown[0]!r}, which is not a class of the model")
            ids = sorted({index[n] for n in names})
            if label in labels:
                if members[labels.index(label)] != ids:
                    raise UserError(f"coarse label {label!r} names two different groups")
                continue
            labels.append(label)
            members.append(ids)
    if not labels:
        raise UserError("no coarse groups to learn")
    return labels, members


def learn_coarse_classes(model: str | Path, families: list[dict], dataset: LabelledImages, out: str | Path,
                         layout: str = "single", minutes: float = 10.0, max_steps: int | None = None,
                         batch_size: int = 128, lr: float = 3e-3, seed: int = 0, threads: int = 0,
                         device: str = "auto", progress=print) -> dict:
    """Learn one class-embedding row per coarse label of `families` ({coarse label: [class names]} dicts) for a
    class-conditional UNet pipeline (ours: `train --conditioning class`), network frozen; write the model with
    the coarse labels appended to its classes, and the families (FAMILIES_FILE, for calibrate --families), to `out`.

    dataset: labelled images whose class names are the model's classes (layout "single"), or Fashion-MNIST items
    for a triples model (layout "triples": composites of three items drawn as it was trained). Each step draws a
    batch, gives each image one coarse label that holds its class (uniformly among those that do) and takes an
    Adam step on the new rows alone. Stops after `minutes` (or `max_steps`); seeded (batches and noise are drawn
    on the CPU, so a device changes the result by float rounding only)."""
    from ..adapters.loading import load_denoiser
    from ..runtime import parse_device

    if layout not in ("single", "triples"):
        raise UserError(f"layout is 'single' or 'triples', not {layout!r}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if out.exists() and not (out / "coarse_summary.json").is_file():
        raise UserError(f"{out} exists and was not written by learn-coarse; choose another --out")
    device = parse_device(device)
    denoiser = load_denoiser(model, device=device, dtype="float32")
    if denoiser.source_dir is not None and out.resolve() == Path(denoiser.source_dir).resolve():
        raise UserError("--out must be a new directory, not the model's own")
    if not isinstance(denoiser, ClassUNetDenoiser):
        raise UserError(f"{model}: coarse classes are learned for class-conditional UNet pipelines (ours); this is "
                        f"a {type(denoiser).__name__}")
    if denoiser.vae is not None:
        raise UserError(f"{model} is a latent model; coarse classes are learned for pixel-space ones for now")
    class_names = list(denoiser.class_names or [])
    network = denoiser.network.float().eval()
    table = network.class_embedding.weight.detach().clone()
    if len(class_names) != len(table):
        raise UserError(f"{model} names {len(class_names)} classes for {len(table)} embedding rows")
    labels, members = coarse_groups(families, class_names)

    # a class's coarse labels: [classes, most labels] padded with -1, to draw one per image without Python loops
    holding = [[] for _ in class_names]
    for k, ids in enumerate(members):
        for i in ids:
            holding[i].append(len(class_names) + k)
    if all(not h for h in holding):
        raise UserError("the families hold none of the model's classes")
    width = max(len(h) for h in holding)
    options = torch.tensor([h + [-1] * (width - len(h)) for h in holding])
    counts = torch.tensor([len(h) for h in holding])

    generator = torch.Generator().manual_seed(seed)
    size = network.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    if layout == "triples":
        if len(class_names) < triples.N_CLASSES:
            raise UserError(f"{model} is not a triples model (it has {len(class_names)} classes)")
        items = preprocess(dataset.items, size[0], channels=1)  # each item at the model's height, side by side
        sampler = triples.TripleSampler(items, torch.as_tensor(dataset.labels), coarse_prob=0.0)

        def draw(size):
            return sampler.batch(size, generator)
    else:
        known = {name: i for i, name in enumerate(class_names)}
        missing = [n for n in dataset.class_names if n not in known]
        if missing:
            raise UserError(f"the data's class {missing[0]!r} is not a class of the model")
        images = preprocess(dataset.items, size, channels=network.config.in_channels)
        ids = torch.tensor([known[dataset.class_names[k]] for k in dataset.labels])
        usable = torch.nonzero(counts[ids] > 0).flatten()
        if len(usable) == 0:
            raise UserError("no image of the data belongs to a coarse group")

        def draw(size):
            pick = usable[torch.randint(0, len(usable), (size,), generator=generator)]
            return images[pick], ids[pick]

    # each new row starts at the mean of its members' rows: the nearest thing the network has seen
    start = torch.stack([table[ids].mean(0) for ids in members])
    embedding = _ExtendedEmbedding(table, start.clone())
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    network.class_embedding = embedding
    schedule = denoiser.schedule
    optimizer = torch.optim.Adam([embedding.new], lr=lr)
    began, step, losses = time.monotonic(), 0, []
    while time.monotonic() - began < 60 * minutes and (max_steps is None or step < max_steps):
        x0, fine = draw(batch_size)
        usable_rows = counts[fine] > 0  # triples: composites whose class no group holds teach nothing
        if not usable_rows.any():
            continue
        x0, fine = x0[usable_rows], fine[usable_rows]
        choice = (torch.rand(len(fine), generator=generator) * counts[fine]).long()
        coarse = options[fine, choice]
        t = torch.randint(0, schedule.num_train_timesteps, (len(fine),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x0, noise, t, coarse = (v.to(device) for v in (x0, noise, t, coarse))
        prediction = network(schedule.noised(x0, noise, t), schedule.model_timestep(t), class_labels=coarse).sample
        loss = torch.mean((prediction - noise) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # brought to the host only when reported
        step += 1
        if progress and step % 500 == 0:
            progress(f"step {step}: loss {torch.stack(losses[-500:]).mean():.5f} ({time.monotonic() - began:.0f} s)")
    if step == 0:
        raise UserError("no training step fitted in the time given")
    if not torch.isfinite(embedding.new).all():
        raise UserError("training diverged (the new rows are not finite): lower --lr; nothing was written")

    rows = torch.cat([table, embedding.new.detach()]).cpu()
    plain = torch.nn.Embedding(*rows.shape)
    plain.weight.data.copy_(rows)
    network = network.cpu()
    network.class_embedding = plain
    network.register_to_config(num_class_embeds=len(rows))
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    names = class_names + labels
    info = dataclasses.replace(denoiser.info, class_names=names, id2label={str(i): n for i, n in enumerate(names)},
                               other={**denoiser.info.other, "coarse_classes": {"learned": labels, "steps": step}})
    _write(ClassUNetDenoiser(network, denoiser.scheduler, info=info), out, families)
    summary = {"coarse_labels": len(labels), "steps": step, "seconds": round(time.monotonic() - began, 1),
               "final_loss": float(torch.stack(losses[-200:]).mean()), "out": str(out)}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "coarse_summary.json")
    return summary


def _write(denoiser: ClassUNetDenoiser, out: Path, families: list[dict]) -> None:
    """The whole model to a sibling temporary directory, then renamed into place: never half a model at `out`."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    denoiser.save_pretrained(tmp)
    (tmp / FAMILIES_FILE).write_text(json.dumps(families, indent=1) + "\n")
    if out.exists():  # an earlier learn-coarse output (checked before training)
        shutil.rmtree(out)
    os.replace(tmp, out)
