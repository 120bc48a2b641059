"""Candidate labels as data: class names, prompt templates, and the prompts they expand to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import UserError


def parse_label_list(text: str, expected: int | None = None) -> list[str]:
    """'a,b,c' -> ['a', 'b', 'c'], rejecting empty and duplicate names."""
    return validate_labels([part.strip() for part in text.split(",")], expected)


def read_labels_file(path: str | Path, expected: int | None = None) -> list[str]:
    """One label per line; a byte-order mark, blank lines and surrounding spaces are ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"labels file {path} is not UTF-8 text") from None
    return validate_labels([line.strip() for line in text.splitlines() if line.strip()], expected)


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
