"""Candidate labels as data: class names, prompt templates, and the prompts they expand to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError


def parse_label_list(text: str, expected: int | None = None) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c'], rejecting empty and duplicate names."""
    return validate_labels([part.strip() for part in text.split(",")], expected)


def read_lines(path: str | Path, what: str = "labels") -> list[str]:
    """The non-blank lines of a text file (labels, templates, captions), stripped; a byte-order mark is ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{what} file {path} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_labels_file(path: str | Path, expected: int | None = None) -> list[str]:
    """One label per line; a byte-order mark, blank lines and surrounding spaces are ignored."""
    return validate_labels(read_lines(path, "labels"), expected)


def validate_labels(labels: Sequence[str], expected: int | None = None) -> list[str]:
    labels = list(labels)
    if not labels or any(not label for label in labels):
        raise UserError("labels must be non-empty names (got an empty label)")
    seen = set()
    for label in labels:
        if label in seen:
            raise UserError(f"duplicate label {label!r}")
        seen.add(label)
    if expected is not None and len(labels) != expected:
        raise UserError(f"expected {expected} labels (one per class, in class-index order), got {len(labels)}")
    return labels


def validate_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise UserError("at least one template is needed")
    for template in templates:
        if "{}" not in template:
            raise UserError(f"template {template!r} has no '{{}}' placeholder for the class name")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):
            raise UserError(f"template {template!r} must contain exactly one '{{}}' and no other braces") from None
    return templates


def expand_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """prompts[c][p] = templates[p] filled with labels[c]."""
    return [[template.format(label) for template in templates] for label in labels]


def candidate_classes(denoiser, labels: Sequence | None, templates: Sequence[str] | None,
                      prompts: Sequence[Sequence[str]] | None) -> tuple[list[str], list]:
    """(class names, conditions) for a denoiser: prompts per class for text models, class ids otherwise."""
    if denoiser.conditioning == "text":
        if prompts is not None:
            prompts = [list(p) for p in prompts]
            if labels is None:
                labels = [p[0] for p in prompts]
            if len(prompts) != len(labels) or any(len(p) != len(prompts[0]) or not p for p in prompts):
                raise UserError("prompts must give the same number of prompts for every label")
            return validate_labels([str(label) for label in labels]), prompts
        if labels is None:
            labels = denoiser.class_names
            if not labels:
                raise UserError("this text-conditioned model has no saved class names; pass labels")
        labels = validate_labels([str(label) for label in labels])
        return labels, expand_prompts(labels, validate_templates(templates or ["{}"]))
    if templates is not None or prompts is not None:
        raise UserError(TEMPLATES_NEED_TEXT)
    names = denoiser.class_names or [str(i) for i in range(denoiser.num_classes)]
    return class_ids(names, labels, denoiser.num_classes)


TEMPLATES_NEED_TEXT = ("templates and prompts (--template, --templates-file) apply to text-conditioned models; this "
                       "model is class-conditional: it takes class ids or its saved class names")


def class_ids(names: Sequence[str], labels: Sequence | None, num_classes: int) -> tuple[list[str], list[int]]:
    """(names, ids) of a class-conditional model's candidates: all its classes, or `labels` given as saved names
    (or a comma-separated part of one, as ImageNet's "tench, Tinca tinca") or integer ids."""
    names = list(names)
    if labels is None:
        return names, list(range(len(names)))
    lookup: dict[str, int] = {}
    for i, name in enumerate(names):
        for key in [name] + [part.strip() for part in name.split(",")]:
            lookup.setdefault(key, i)
    ids = []
    for label in labels:
        if isinstance(label, (int, np.integer)) or (isinstance(label, str) and label.isdigit()
                                                     and label not in lookup):
            ids.append(int(label))
        elif label in lookup:
            ids.append(lookup[label])
        else:
            raise UserError(f"label {label!r} is not one of the model's classes "
                            f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})")
    if len(set(ids)) != len(ids):
        raise UserError("duplicate labels")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is outside the model's {num_classes} classes")
    return [names[i] if i < len(names) else str(i) for i in ids], ids
