"""Fashion-MNIST triples: three items side by side, 1,000 ordered classes, and coarse classes above them.

The 1,000-way task of the many-candidates benchmark. A canvas 28 pixels high and 84 wide holds items
(a, b, c) of the ten Fashion-MNIST classes (repeats allowed) in columns 0-27, 28-55 and 56-83 (a model
trained at --resolution r sees it at r x 3r: each item resized, then side by side). A class-conditional
model trained with `train --layout triples` knows 1,110 classes:

* ids 0-999: the ordered triple (a, b, c), id 100 a + 10 b + c, named "Bag, Coat, Shirt";
* ids 1000-1099: "a, b, *" (the first two items, anything third), id 1000 + 10 a + b;
* ids 1100-1109: "a, *, *", id 1100 + a.

Training labels a share `coarse_prob` of samples with one of their coarse classes (half each level), so
the coarse classes are in the model's training distribution: a coarse-to-fine search (CoarseToFine with
the families of `coarse_families`) can score 10 first-item candidates, then the first-two-items ones
under the best, then the triples under those. The class embedding is factorised while training (one
table per position, each with a row for "anything"), which lets 1,000 classes share what they have in
common; export writes it out as a plain 1,110-row embedding, so the model is an ordinary diffusers
UNet2DModel.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

ITEM = 28
N_ITEMS = 10
FINE = N_ITEMS ** 3  # 1,000
TWO = FINE  # first id of the "a, b, *" classes
ONE = FINE + N_ITEMS ** 2  # first id of the "a, *, *" classes
N_CLASSES = ONE + N_ITEMS  # 1,110


def class_names(item_names: list[str]) -> list[str]:
    if len(item_names) != N_ITEMS:
        raise UserError(f"the triples layout needs {N_ITEMS} item classes, the data has {len(item_names)}")
    n = item_names
    return ([f"{n[a]}, {n[b]}, {n[c]}" for a in range(N_ITEMS) for b in range(N_ITEMS) for c in range(N_ITEMS)]
            + [f"{n[a]}, {n[b]}, *" for a in range(N_ITEMS) for b in range(N_ITEMS)]
            + [f"{n[a]}, *, *" for a in range(N_ITEMS)])


def positions(ids: torch.Tensor) -> torch.Tensor:
    """[..., 3] item index per position for class ids (N_ITEMS stands for "anything")."""
    ids = ids.long()
    fine, two = ids < TWO, (ids >= TWO) & (ids < ONE)
    a = torch.where(fine, ids // 100, torch.where(two, (ids - TWO) // N_ITEMS, ids - ONE))
    b = torch.where(fine, ids // 10 % 10, torch.where(two, (ids - TWO) % N_ITEMS, N_ITEMS))
    c = torch.where(fine, ids % 10, torch.full_like(ids, N_ITEMS))
    return torch.stack([a, b, c], dim=-1)


class FactorisedClassEmbedding(torch.nn.Module):
    """The class embedding of a triples model while it trains: one table per position (11 rows: the ten items
    and "anything"), summed. `table()` gives the plain [N_CLASSES, dim] embedding it stands for."""

    def __init__(self, dim: int):
        super().__init__()
        self.slots = torch.nn.Parameter(torch.randn(3, N_ITEMS + 1, dim) / 3 ** 0.5)  # the sum: unit variance

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = positions(ids)
        return sum(self.slots[k][where[..., k]] for k in range(3))

    def table(self) -> torch.Tensor:
        return self.forward(torch.arange(N_CLASSES, device=self.slots.device))


def factorise(network: torch.nn.Module) -> torch.nn.Module:
    """Give a UNet2DModel with N_CLASSES class embeddings the factorised embedding (in place)."""
    dim = network.class_embedding.embedding_dim
    network.class_embedding = FactorisedClassEmbedding(dim).to(network.class_embedding.weight.device)
    return network


def materialise(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of a factorised network with the plain embedding it stands for (what export saves)."""
    import copy

    plain = copy.deepcopy(network)
    table = network.class_embedding.table().detach()
    plain.class_embedding = torch.nn.Embedding(N_CLASSES, table.shape[1]).to(table.device)
    plain.class_embedding.weight.data.copy_(table)
    return plain


class TripleSampler:
    """Training composites for the triples model: three items of uniformly drawn classes (repeats allowed),
    labelled with their triple's id, or for a share `coarse_prob` with a coarse class (half each level)."""

    def __init__(self, items: torch.Tensor, labels: torch.Tensor, coarse_prob: float = 0.2):
        counts = torch.bincount(labels, minlength=N_ITEMS)
        if len(counts) != N_ITEMS or (counts == 0).any():
            raise UserError(f"the triples layout needs training images of each of {N_ITEMS} classes (and only those)")
        self.items, self.coarse_prob = items, coarse_prob  # items: [N, 1, 28, 28] in [-1, 1]
        self.order = torch.argsort(labels, stable=True)
        self.class_start, self.class_count = torch.cumsum(counts, 0) - counts, counts

    def to(self, device: torch.device) -> TripleSampler:
        for name in ("items", "order", "class_start", "class_count"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """([size, 1, 28, 84] composites, [size] class ids)."""
        device = self.items.device
        classes = torch.randint(0, N_ITEMS, (3, size), generator=generator, device=device)
        u = torch.rand(5, size, generator=generator, device=device)
        canvas = torch.cat([self.items[self.order[self.class_start[k] + (w * self.class_count[k]).long()]]
                            for k, w in zip(classes, u[:3])], dim=-1)
        a, b, c = classes
        ids = 100 * a + 10 * b + c
        coarse = u[3] < self.coarse_prob
        ids = torch.where(coarse & (u[4] < 0.5), TWO + 10 * a + b, ids)
        ids = torch.where(coarse & (u[4] >= 0.5), ONE + a, ids)
        return canvas, ids


def coarse_families(names: list[str]) -> list[dict[str, list[str]]]:
    """CoarseToFine's levels for a triples model with these class names: first items, then first two items."""
    first = {names[ONE + a]: [names[TWO + 10 * a + b] for b in range(N_ITEMS)] for a in range(N_ITEMS)}
    second = {names[TWO + 10 * a + b]: [names[100 * a + 10 * b + c] for c in range(N_ITEMS)]
              for a in range(N_ITEMS) for b in range(N_ITEMS)}
    # a level's groups are over the classes: the first level keeps the triples under its kept first items
    first_over_triples = {coarse: [t for two in members for t in second[two]] for coarse, members in first.items()}
    return [first_over_triples, second]


def position_families(names: list[str]) -> list[dict[str, list[str]]]:
    """Families a triples model's training never names, for `learn-coarse`: by the middle item ("*, Bag, *"), then
    by the third ("*, *, Bag"), each over the 1,000 triples."""
    items = [names[c].split(", ")[2] for c in range(N_ITEMS)]
    middle = {f"*, {items[b]}, *": [names[100 * a + 10 * b + c] for a in range(N_ITEMS) for c in range(N_ITEMS)]
              for b in range(N_ITEMS)}
    third = {f"*, *, {items[c]}": [names[100 * a + 10 * b + c] for a in range(N_ITEMS) for b in range(N_ITEMS)]
             for c in range(N_ITEMS)}
    return [middle, third]


def test_composites(images: np.ndarray, labels: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n composites [n, 28, 84] of test items (each used at most once) with their triple ids, classes uniform."""
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(N_ITEMS)]
    ids = rng.integers(0, FINE, n)
    pictures = np.stack([np.concatenate([images[pools[int(d)].pop()] for d in (k // 100, k // 10 % 10, k % 10)],
                                        axis=1) for k in ids])
    return pictures, ids
