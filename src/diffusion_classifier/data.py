"""Images in, tensors out: loading, preprocessing, and the datasets we evaluate and train on."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, warn_once

RESOURCES = Path(__file__).resolve().parent / "resources"  # the package's data files
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so truncated files fail here, with a clear message)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an image: give image files (evaluate --data takes a folder)")
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except Image.DecompressionBombError as exc:
        raise UserError(f"cannot read image {path}: too large ({exc})".split(" could be")[0]) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from exc


def image_list(images) -> list:
    """One image (a path, a PIL image, an HxW / HxWxC / CxHxW array or tensor) or a sequence of them -> a list
    (a batch array or tensor [N, ...] is N images)."""
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        return [images] if images.ndim <= 3 else list(images)
    return list(images)


def to_pil(image) -> Image.Image:
    """Accept a PIL image, a path, or an array/tensor (HW, HWC uint8/float, or CHW in [-1, 1] / [0, 1])."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().float().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        if array.min() < 0:  # a [-1, 1] tensor
            array = (array + 1) / 2
        image = array
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):  # CxHxW
            array = array.transpose(1, 2, 0)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            scale = 255 if array.max() <= 1.0 else 1
            array = np.clip(array.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise UserError(f"image arrays must be HxW, HxWxC or CxHxW (C = 1, 3 or 4); got shape {image.shape}")
        return Image.fromarray(array)
    raise UserError(f"unsupported image type {type(image).__name__}")


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits first
        array = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((255 * array / max(array.max(), 1)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # flatten transparency onto white
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("L" if channels == 1 else "RGB")


def preprocess(images: Sequence, resolution: int | tuple[int, int], channels: int = 3,
               interpolation: str = "bicubic") -> torch.Tensor:
    """As in the paper: resize so the image covers the model's (height, width) (the short side, for square
    models), center crop, scale to [-1, 1]. -> [B, C, H, W] float32. An image of the model's own size is
    left as it is (a 28 x 56 pair for a 28 x 56 model keeps both items)."""
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    out = []
    for image in images:
        img = _to_mode(ImageOps.exif_transpose(to_pil(image)) or to_pil(image), channels)
        if img.size != (width, height):
            w, h = img.size
            stretch = max((w / h) / (width / height), (h / w) * (width / height))
            # a non-square model's layout is a contract (a pair's two halves); a square one center-crops photos
            # as the paper does, and warns only when the crop cuts off more than a third of the image
            if stretch > (1.1 if width != height else 1.5):
                warn_once(f"a {w}x{h} image goes into a model that takes {width}x{height} (width x height): it is "
                          f"resized to cover that shape and center-cropped, so {100 * (1 - 1 / stretch):.0f}% of "
                          "it is cut off")
            scale = max(width / w, height / h)
            img = img.resize((max(width, round(w * scale)), max(height, round(h * scale))),
                             INTERPOLATIONS[interpolation])
            w, h = img.size
            left, top = (w - width) // 2, (h - height) // 2
            img = img.crop((left, top, left + width, top + height))
        array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        out.append(torch.from_numpy(array[None] if channels == 1 else array.transpose(2, 0, 1).copy()))
    return torch.stack(out) if out else torch.empty(0, channels, height, width)


# ----- datasets ---------------------------------------------------------------------

@dataclass
class LabelledImages:
    """A labelled dataset: `items[i]` is a path or a PIL image, `labels[i]` an index into `class_names`."""

    items: list
    labels: np.ndarray
    class_names: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, indices: Sequence[int]) -> LabelledImages:
        indices = list(indices)
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad:
            raise UserError(f"subset index {bad[0]} is out of range for a dataset of {len(self)} images")
        return LabelledImages(_View(self.items, indices), self.labels[indices],
                              self.class_names, [self.ids[i] for i in indices])


class _View:
    """Lazy indexed view, so subsets of large datasets do not load every image up front."""

    def __init__(self, items, indices: list[int]):
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.items[self.indices[i]]


def image_folder(root: str | Path) -> LabelledImages:
    """ImageFolder layout: one subfolder per class, class names from folder names (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{root} has no class subfolders (expected ImageFolder layout: ROOT/CLASS/IMAGE)")
    items, labels, ids = [], [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(file)
                labels.append(label)
                ids.append(str(file.relative_to(root)))
    if not items:
        raise UserError(f"no images found under {root}")
    return LabelledImages(items, np.asarray(labels), classes, ids)


FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
# the class names live in the dataset's preset (resources/datasets/fashion-mnist.json), as every dataset's do
FASHION_MNIST_CLASSES = json.loads((RESOURCES / "datasets" / "fashion-mnist.json").read_text(encoding="utf-8"))[
    "classes"]
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def fashion_mnist_dir() -> Path:
    candidates = [os.environ.get("FASHION_MNIST_DIR")] + list(FASHION_MNIST_DIRS)
    for candidate in filter(None, candidates):
        if (Path(candidate) / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(candidate)
    raise UserError(f"Fashion-MNIST not found; install it with: {FASHION_MNIST_INSTALL} "
                    "(or set FASHION_MNIST_DIR to a folder with the idx files)")


def fashion_mnist_arrays(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int [N]) from the Debian package's idx files."""
    if split not in ("train", "test"):
        raise UserError(f"unknown split {split!r}; choose train or test")
    root = fashion_mnist_dir()
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


def fashion_mnist(split: str = "test") -> LabelledImages:
    images, labels = fashion_mnist_arrays(split)
    items = [Image.fromarray(img) for img in images]
    return LabelledImages(items, labels, list(FASHION_MNIST_CLASSES), [f"{split}/{i}" for i in range(len(items))])


def _labels_to_indices(raw: list, source: str) -> tuple[np.ndarray, list[str]]:
    names = sorted({str(label) for label in raw}, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else x))
    if not names:
        raise UserError(f"{source} lists no images")
    index = {name: i for i, name in enumerate(names)}
    return np.array([index[str(label)] for label in raw]), names


def manifest(path: str | Path) -> LabelledImages:
    """A CSV (columns path,label) or JSONL ({"path": ..., "label": ...}) list of images.

    Relative paths are taken from the manifest's folder; class names are the distinct labels, sorted.
    """
    import csv
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
                raise UserError(f"{path}: a CSV manifest needs the columns 'path' and 'label'")
            rows = [(r["path"], r["label"]) for r in reader]
        else:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    rows.append((record["path"], record["label"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{number}: expected a JSON object with 'path' and 'label'") from None
    items = [p if Path(p).is_absolute() else path.parent / p for p, _ in rows]
    labels, names = _labels_to_indices([label for _, label in rows], str(path))
    return LabelledImages(items, labels, names, [str(p) for p, _ in rows])


class _HFImages:
    def __init__(self, dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[int(i)][self.column]


def hf_dataset(root: str | Path, split: str = "test") -> LabelledImages:
    """A Hugging Face `datasets` dataset saved with save_to_disk (image and ClassLabel columns)."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a saved Hugging Face dataset needs: pip install datasets") from None
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{root} has splits {', '.join(loaded)}; choose one with --split")
        loaded = loaded[split]
    image_cols = [k for k, v in loaded.features.items() if isinstance(v, datasets.Image)]
    label_cols = [k for k, v in loaded.features.items() if isinstance(v, datasets.ClassLabel)]
    if not image_cols or not label_cols:
        raise UserError(f"{root} needs an Image column and a ClassLabel column")
    labels = np.asarray(loaded[label_cols[0]])
    return LabelledImages(_HFImages(loaded, image_cols[0]), labels, list(loaded.features[label_cols[0]].names),
                          [f"{split}/{i}" for i in range(len(loaded))])


BUILTIN_DATASETS = {"fashion-mnist": fashion_mnist}


def load_dataset(source: str, split: str = "test") -> LabelledImages:
    """A built-in name, a CSV/JSONL manifest, a saved Hugging Face dataset, or an ImageFolder directory."""
    if source in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[source](split)
    path = Path(source)
    if path.suffix.lower() in (".csv", ".jsonl"):
        return manifest(path)
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return hf_dataset(path, split)
    return image_folder(path)


def read_subset(path: str | Path) -> list[int]:
    """A file of dataset indices, one per line (blank lines and # comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"subset file not found: {path}")
    indices = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        try:
            indices.append(int(line))
        except ValueError:
            raise UserError(f"{path}:{number}: not an integer index: {line!r}") from None
    if not indices:
        raise UserError(f"subset file {path} lists no indices")
    return indices
