"""Fashion-MNIST pairs: two items side by side, captions whose word order says which is where.

The layout is a contract, so any such set can be scored: a canvas 28 pixels high and 56 wide, the left
item in columns 0-27 and the right one in 28-55, the raw Fashion-MNIST items, no padding; a single item
leaves the other half black. Captions come from resources/fashion_mnist_pairs.json: each item's phrase
(its name or, in training, a synonym) put into a template; "{left} to the left of {right}" and
"{right} to the right of {left}" describe the same image.

* `PairSampler` draws training composites on the fly (deterministically per step) with captions from a
  bank embedded once.
* `winoground_examples` builds Winoground-style test examples: classes a != b, image_0 = [a | b] and
  image_1 = [b | a] from four different item instances, caption_0 = T(a, b) and caption_1 = T(b, a),
  the same words in another order. `write_winoground` saves them as a JSONL manifest with PNGs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import RESOURCES
from ..errors import UserError

ITEM = 28  # side of one item; the canvas is ITEM x 2 ITEM


def load_spec(path: str | Path | None = None) -> dict:
    source = Path(path) if path else RESOURCES / "fashion_mnist_pairs.json"
    try:
        spec = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the pairs captions file {source}: {exc}") from None
    for key in ("names", "train_synonyms", "train_templates", "heldout_templates", "single_templates", "sides"):
        if key not in spec:
            raise UserError(f"{source} has no {key!r}")
    return spec


def pair_caption(template: str, left: str, right: str) -> str:
    return template.format(left=left, right=right)


def compose(left: np.ndarray | None, right: np.ndarray | None) -> np.ndarray:
    """Two [28, 28] uint8 items -> one [28, 56] canvas (None: that half stays black)."""
    blank = np.zeros((ITEM, ITEM), dtype=np.uint8)
    return np.concatenate([blank if left is None else left, blank if right is None else right], axis=1)


class PairSampler:
    """Training composites for the text-conditioned pairs model.

    Per step, a share `single_prob` of the samples is one item on a random side (captioned with the single
    templates), the rest two items of different classes; phrases are drawn from each class's name and
    training synonyms, templates from the training templates (never the held-out ones).
    """

    def __init__(self, items: torch.Tensor, labels: torch.Tensor, spec: dict, single_prob: float = 0.2):
        self.items, self.single_prob = items, single_prob  # items: [N, 1, 28, 28] in [-1, 1]
        n_classes = len(spec["names"])
        counts = torch.bincount(labels, minlength=n_classes)
        if len(counts) != n_classes or (counts == 0).any():
            raise UserError("the pairs layout needs training images of every class (and only those)")
        self.order = torch.argsort(labels, stable=True)  # item indices grouped by class
        self.class_start, self.class_count = torch.cumsum(counts, 0) - counts, counts
        phrases = [[name, *syn] for name, syn in zip(spec["names"], spec["train_synonyms"])]
        self.captions = [""]  # index 0: the empty caption
        # captions of (left class, right class) are contiguous: start and count per pair, and per (class, side)
        self.pair_start = torch.zeros(n_classes, n_classes, dtype=torch.long)
        self.pair_count = torch.zeros(n_classes, n_classes, dtype=torch.long)
        for a in range(n_classes):
            for b in range(n_classes):
                if a != b:
                    self.pair_start[a, b] = len(self.captions)
                    self.captions += [pair_caption(template, left, right) for template in spec["train_templates"]
                                      for left in phrases[a] for right in phrases[b]]
                    self.pair_count[a, b] = len(self.captions) - self.pair_start[a, b]
        self.single_start = torch.zeros(n_classes, 2, dtype=torch.long)
        self.single_count = torch.zeros(n_classes, 2, dtype=torch.long)
        for c in range(n_classes):
            for s, side in enumerate(spec["sides"]):
                self.single_start[c, s] = len(self.captions)
                self.captions += [template.format(item=phrase, side=side) for template in spec["single_templates"]
                                  for phrase in phrases[c]]
                self.single_count[c, s] = len(self.captions) - self.single_start[c, s]
        self.swapped = self._swap_table(n_classes, len(spec["train_templates"]), len(phrases[0]))

    def _swap_table(self, n_classes: int, n_templates: int, n_phrases: int) -> torch.Tensor:
        """swapped[k]: the caption with the same template and phrases as pair caption k but the two items
        exchanged (the same words in the other order: a hard negative); -1 for other captions."""
        swapped = torch.full((len(self.captions),), -1, dtype=torch.long)
        t, i, j = torch.meshgrid(torch.arange(n_templates), torch.arange(n_phrases), torch.arange(n_phrases),
                                 indexing="ij")
        offset = t * n_phrases * n_phrases + i * n_phrases + j  # template t, left phrase i, right phrase j
        mirror = t * n_phrases * n_phrases + j * n_phrases + i
        for a in range(n_classes):
            for b in range(n_classes):
                if a != b and self.pair_count[a, b] == offset.numel():
                    swapped[self.pair_start[a, b] + offset.flatten()] = self.pair_start[b, a] + mirror.flatten()
        return swapped

    def to(self, device: torch.device) -> PairSampler:
        """Move the items and index tables (training draws composites where the items live)."""
        for name in ("items", "order", "class_start", "class_count", "pair_start", "pair_count", "single_start",
                     "single_count", "swapped"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def _item(self, classes: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A uniformly chosen item of each class (u uniform in [0, 1))."""
        within = (u * self.class_count[classes]).long()
        return self.items[self.order[self.class_start[classes] + within]]

    def batch(self, size: int, generator: torch.Generator, empty_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
        """([size, 1, 28, 56] composites, [size] caption indices into `captions`)."""
        n_classes, device = len(self.class_count), self.items.device
        a = torch.randint(0, n_classes, (size,), generator=generator, device=device)
        b = (a + torch.randint(1, n_classes, (size,), generator=generator, device=device)) % n_classes  # b != a
        single = torch.rand(size, generator=generator, device=device) < self.single_prob
        side = torch.randint(0, 2, (size,), generator=generator, device=device)
        u = torch.rand(4, size, generator=generator, device=device)
        item_a, item_b = self._item(a, u[0]), self._item(b, u[1])
        blank = torch.full_like(item_a, -1.0)
        left = torch.where((single & (side == 1)).view(-1, 1, 1, 1), blank, item_a)
        right = torch.where(single.view(-1, 1, 1, 1), torch.where((side == 0).view(-1, 1, 1, 1), blank, item_a),
                            item_b)
        start = torch.where(single, self.single_start[a, side], self.pair_start[a, b])
        count = torch.where(single, self.single_count[a, side], self.pair_count[a, b])
        captions = start + (u[2] * count).long()
        captions = torch.where(u[3] < empty_prob, torch.zeros_like(captions), captions)
        return torch.cat([left, right], dim=-1), captions


@dataclass
class PairExample:
    image_0: np.ndarray  # [28, 56] uint8: class a left, class b right
    image_1: np.ndarray  # [28, 56] uint8: class b left, class a right (other instances)
    caption_0: str
    caption_1: str
    tag: str  # "train-template" or "heldout-template"
    classes: tuple[int, int]


def winoground_examples(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0,
                        spec: dict | None = None, heldout_share: float = 0.5) -> list[PairExample]:
    """n examples from one split's items (use the test split for evaluation); a share `heldout_share`
    of them uses the held-out templates. Class names (not synonyms) fill the templates."""
    spec = spec or load_spec()
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(len(spec["names"]))]
    out = []
    for k in range(n):
        a, b = rng.choice(len(by_class), size=2, replace=False)
        a_items = rng.choice(by_class[a], size=2, replace=False)
        b_items = rng.choice(by_class[b], size=2, replace=False)
        heldout = k < round(heldout_share * n)
        templates = spec["heldout_templates"] if heldout else spec["train_templates"]
        template = templates[rng.integers(len(templates))]
        names = spec["names"]
        out.append(PairExample(compose(images[a_items[0]], images[b_items[0]]),
                               compose(images[b_items[1]], images[a_items[1]]),
                               pair_caption(template, names[a], names[b]), pair_caption(template, names[b], names[a]),
                               "heldout-template" if heldout else "train-template", (int(a), int(b))))
    return out


def write_winoground(examples: list[PairExample], directory: str | Path) -> Path:
    """PNGs plus manifest.jsonl in the Winoground layout (paths relative to the manifest)."""
    from PIL import Image

    from ..runtime import atomic_write_text

    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for k, ex in enumerate(examples):
        paths = []
        for j, image in enumerate((ex.image_0, ex.image_1)):
            path = f"images/{k:05d}_{j}.png"
            Image.fromarray(image).save(directory / path)
            paths.append(path)
        lines.append(json.dumps({"image_0": paths[0], "image_1": paths[1], "caption_0": ex.caption_0,
                                 "caption_1": ex.caption_1, "tag": ex.tag}))
    manifest = directory / "manifest.jsonl"
    atomic_write_text("\n".join(lines) + "\n", manifest)
    return manifest
