"""The captions a text model trains on: class names, synonyms and templates, embedded once (CaptionBank)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import RESOURCES
from ..errors import UserError


class CaptionBank:
    """Every caption the text model trains on, embedded once by the frozen text encoder."""

    def __init__(self, class_names: list[str], synonyms: list[list[str]], templates: list[str]):
        self.captions = [""]  # index 0: the empty caption
        self.by_class: list[list[int]] = []
        for name, words in zip(class_names, synonyms):
            indices = []
            for word in dict.fromkeys([name, *words]):
                for template in templates:
                    indices.append(len(self.captions))
                    self.captions.append(template.format(word))
            self.by_class.append(indices)

        width = max(len(options) for options in self.by_class)
        self.table = torch.tensor([options + [0] * (width - len(options)) for options in self.by_class])
        self.counts = torch.tensor([len(options) for options in self.by_class])

    def to(self, device: torch.device) -> CaptionBank:
        self.table, self.counts = self.table.to(device), self.counts.to(device)
        return self

    def sample(self, labels: torch.Tensor, generator: torch.Generator, empty_prob: float) -> torch.Tensor:
        """A caption index per label: one of its class's captions, or the empty caption (index 0)."""
        device = self.table.device
        choice = torch.rand(len(labels), generator=generator, device=device)
        within = (choice.double() * self.counts[labels]).long()  # float64, as the earlier per-item loop did
        out = self.table[labels, within]
        empty = torch.rand(len(labels), generator=generator, device=device) < empty_prob
        return torch.where(empty, torch.zeros_like(out), out)


def load_captions(path: str, class_names: list[str]) -> tuple[list[list[str]], list[str]]:
    source = Path(path) if path else RESOURCES / "fashion_mnist.json"
    try:
        spec = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read captions file {source}: {exc}") from exc
    synonyms = spec.get("train_synonyms") or [[] for _ in class_names]
    templates = spec.get("train_templates") or ["{}"]
    if len(synonyms) != len(class_names):
        raise UserError(f"{source}: train_synonyms has {len(synonyms)} entries for {len(class_names)} classes")
    return synonyms, templates
