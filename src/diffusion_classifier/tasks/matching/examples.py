"""Image-text benchmark data: Winoground-layout sets and true/false-caption sets.

Winoground layout, a JSONL manifest with one example a line (paths relative to the manifest's folder):
    {"image_0": path, "image_1": path, "caption_0": str, "caption_1": str, "tag": optional str}
or a Hugging Face dataset saved with `save_to_disk` with the columns of facebook/winoground
(image_0, image_1, caption_0, caption_1, and collapsed_tag or tag).

True/false-caption layout (ARO, SugarCrepe), a JSONL manifest:
    {"image": path, "true_caption": str, "false_caption": str}

Every image of a manifest is opened when the set is loaded, so a missing or unreadable file, or a missing
field, is one clear error before any scoring starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...data import load_image
from ...errors import UserError


@dataclass
class WinogroundExample:
    id: str
    images: tuple  # (image_0, image_1): paths or PIL images
    captions: tuple[str, str]
    tag: str | None = None


@dataclass
class CaptionPair:
    id: str
    image: object
    captions: tuple[str, str]  # (true caption, false caption)


def _read_jsonl(path: Path, fields: tuple[str, ...], image_fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"manifest {path} is not UTF-8 text") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        for key in fields:
            if key not in record:
                raise UserError(f"{path}:{number}: missing field {key!r}")
            if not isinstance(record[key], str) or not record[key].strip():
                raise UserError(f"{path}:{number}: field {key!r} must be a non-empty string")
        for key in image_fields:
            image = Path(record[key])
            image = image if image.is_absolute() else path.parent / image
            try:
                load_image(image)
            except UserError as exc:
                raise UserError(f"{path}:{number}: {exc}") from None
            record[key] = image
        rows.append((number, record))
    if not rows:
        raise UserError(f"manifest {path} lists no examples")
    return rows


def load_winoground(source: str | Path) -> list[WinogroundExample]:
    """A Winoground-layout JSONL manifest, or a saved Hugging Face dataset directory."""
    source = Path(source)
    if source.is_dir():
        return _winoground_from_hf(source)
    fields = ("image_0", "image_1", "caption_0", "caption_1")
    return [WinogroundExample(f"{source.name}:{number}", (r["image_0"], r["image_1"]), (r["caption_0"], r["caption_1"]),
                              r.get("tag") or r.get("collapsed_tag"))
            for number, r in _read_jsonl(source, fields, fields[:2])]


def _winoground_from_hf(root: Path) -> list[WinogroundExample]:
    if not ((root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file()):
        raise UserError(f"{root} is neither a JSONL manifest nor a saved Hugging Face dataset")
    try:
        import datasets
    except ImportError:
        raise UserError("reading a saved Hugging Face dataset needs: pip install datasets") from None
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise UserError(f"{root} has splits {', '.join(loaded)}; save the one to evaluate")
        loaded = next(iter(loaded.values()))
    missing = [c for c in ("image_0", "image_1", "caption_0", "caption_1") if c not in loaded.column_names]
    if missing:
        raise UserError(f"{root} lacks the column(s) {', '.join(missing)} of the Winoground layout")
    tag_column = next((c for c in ("collapsed_tag", "tag") if c in loaded.column_names), None)
    out = []
    for i, row in enumerate(loaded):
        out.append(WinogroundExample(str(row.get("id", i)), (row["image_0"], row["image_1"]),
                                     (row["caption_0"], row["caption_1"]), row[tag_column] if tag_column else None))
    if not out:
        raise UserError(f"{root} holds no examples")
    return out


def load_caption_pairs(source: str | Path) -> list[CaptionPair]:
    """A true/false-caption JSONL manifest."""
    source = Path(source)
    return [CaptionPair(f"{source.name}:{number}", r["image"], (r["true_caption"], r["false_caption"]))
            for number, r in _read_jsonl(source, ("image", "true_caption", "false_caption"), ("image",))]
