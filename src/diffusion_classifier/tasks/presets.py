"""The paper's datasets as data: class names in label order, prompts, and the staged schedule and loss.

Each preset is one JSON file in resources/datasets/ (see docs/datasets.md):
  classes        names in the dataset's label order (label id i is classes[i])
  templates      the paper's prompt template(s) for a class name
  prompts        optional: the paper's exact prompts per class, where they are not one template
                 (Oxford Pets: "a photo of a Abyssinian cat, a type of pet.")
  prompt_names   optional: {label id: the name the paper's prompts use} where it differs from the class
                 name (ImageNet's two pairs of classes that CLIP's names, and so the paper's prompts, merge)
  folders        optional: the dataset's own folder name per class (ImageNet WordNet ids, Food-101's
                 apple_pie, ...), for mapping an ImageFolder onto the label order
  staged, loss   the paper's adaptive schedule and loss for the dataset, where it gives one
  paper_accuracy Diffusion Classifier's zero-shot accuracy with Stable Diffusion 2.0 in the paper
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..data import RESOURCES, LabelledImages
from ..engine.config import ScoringConfig
from ..engine.strategies import Staged
from ..errors import UserError
from .labels import expand_prompts, validate_labels, validate_templates

PRESET_DIR = RESOURCES / "datasets"
PRESET_NAMES = sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def _key(name: str) -> str:
    """Folder and class names compare without case, '_' or repeated spaces."""
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def same_class(name: str, other: str) -> bool:
    """Whether two class names name one class: equal as keys, or one is a comma-separated synonym of the other
    (ImageNet's "tench, Tinca tinca")."""
    synonyms = lambda n: {_key(part) for part in [n, *n.split(",")] if part.strip()}  # noqa: E731
    return bool(synonyms(name) & synonyms(other))


@dataclass(frozen=True)
class DatasetPreset:
    name: str
    title: str
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...] | None = None
    prompt_names: tuple[str, ...] | None = None
    folders: tuple[str, ...] | None = None
    strategy: Staged | None = None
    loss: str | None = None
    paper_accuracy: float | None = None
    layout: str = ""
    class_tree: dict | None = field(default=None, compare=False)  # nested groups of class names (imagenet: WordNet)

    def candidates(self, labels: Sequence[str] | None = None,
                   templates: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
        """(labels, prompts per label): the preset's unless labels or templates are given."""
        if labels is None and templates is None:
            prompts = self.prompts or expand_prompts(self.prompt_names or self.classes, self.templates)
            return list(self.classes), [list(p) for p in prompts]
        labels = validate_labels(labels if labels is not None else self.classes)
        templates = validate_templates(templates if templates is not None else self.templates)
        return labels, expand_prompts(labels, templates)

    def label_of_folder(self, folder: str) -> int | None:
        """The label id of an ImageFolder class folder: its own name, a class name, or a label id."""
        key = _key(folder)
        for names in (self.folders or (), self.classes):
            for i, name in enumerate(names):
                if _key(name) == key:
                    return i
        return int(folder) if folder.isdigit() and int(folder) < len(self.classes) else None

    def relabel(self, dataset: LabelledImages) -> LabelledImages:
        """The dataset with the preset's class names and label ids (all of the preset's classes are candidates).

        Numeric folders are label ids from 0; folders numbered 1..K without a 0 (Flowers-102's original
        numbering) are taken as ids from 1."""
        names = dataset.class_names
        numeric = all(n.isdigit() for n in names)
        offset = 1 if numeric and "0" not in names and max(map(int, names)) == len(self.classes) else 0
        ids = []
        for name in names:
            i = int(name) - offset if numeric else self.label_of_folder(name)
            if i is None or not 0 <= i < len(self.classes):
                raise UserError(f"class folder {name!r} is not a class of the {self.name} preset (expected "
                                f"{self.layout or 'folders named by class'})")
            ids.append(i)
        if len(set(ids)) != len(ids):
            raise UserError(f"two class folders map to the same {self.name} class: {sorted(names)}")
        return LabelledImages(dataset.items, np.asarray(ids)[dataset.labels], list(self.classes), dataset.ids)


def preset(name: str) -> DatasetPreset:
    """A dataset preset by name (cifar10, cifar100, stl10, pets, flowers, food, aircraft, imagenet, objectnet,
    mnist): its class names and prompts, and `.strategy` the paper's staged schedule (None where it gives none)."""
    if isinstance(name, DatasetPreset):
        return name
    path = PRESET_DIR / f"{name}.json"
    if name not in PRESET_NAMES or not path.is_file():
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
    d = json.loads(path.read_text(encoding="utf-8"))
    staged = d.get("staged")
    renamed = {int(i): n for i, n in d.get("prompt_names", {}).items()}
    return DatasetPreset(
        name=d["name"], title=d["title"], classes=tuple(d["classes"]), templates=tuple(d["templates"]),
        prompts=tuple(tuple(p) for p in d["prompts"]) if d.get("prompts") else None,
        prompt_names=tuple(renamed.get(i, c) for i, c in enumerate(d["classes"])) if renamed else None,
        folders=tuple(d["folders"]) if d.get("folders") else None,
        strategy=Staged(staged["n_samples"], staged["to_keep"]) if staged else None,
        loss=d.get("loss"), paper_accuracy=d.get("paper_accuracy"), layout=d.get("layout", ""),
        class_tree=d.get("class_tree"))


def scoring_config(chosen: str | DatasetPreset | None = None, **options) -> ScoringConfig:
    """ScoringConfig from its fields; with a preset and no strategy given (None or absent), the preset's staged
    schedule together with its loss (a loss given explicitly wins). This is the one place a preset's scoring
    meaning is applied."""
    options = dict(options)
    if chosen is not None and options.get("strategy") is None:
        chosen = preset(chosen)
        if chosen.strategy is not None:
            options["strategy"] = chosen.strategy
            if options.get("loss") is None:
                options["loss"] = chosen.loss
    if options.get("strategy") is None:
        options.pop("strategy", None)
    return ScoringConfig.from_options(**options)


def preset_class_ids(chosen: DatasetPreset, denoiser) -> list[int]:
    """The model's class ids for a dataset relabelled by a preset: label i is class i, when the model's classes
    are the preset's. A model trained on other classes is refused rather than silently renamed."""
    names = denoiser.class_names
    if denoiser.num_classes != len(chosen.classes):
        raise UserError(f"the {chosen.name} preset has {len(chosen.classes)} classes and this class-conditional "
                        f"model {denoiser.num_classes}: a class-conditional model scores only its own classes")
    if names:
        agree = sum(same_class(a, b) for a, b in zip(chosen.classes, names))
        if agree < len(names) / 2:
            raise UserError(f"the {chosen.name} preset's classes ({', '.join(chosen.classes[:3])}, ...) are not "
                            f"this class-conditional model's ({', '.join(names[:3])}, ...), which scores only its "
                            "own classes; to rename the dataset's classes to the model's on purpose, pass them "
                            "with --labels in the dataset's class order")
    return list(range(len(chosen.classes)))
