"""Image-text matching: score images against free texts with a text-conditioned diffusion model.

For an image x and a text c the match score is the negated mean denoising error over the strategy's
(t, eps) pairs, which every text of that image shares (a paired comparison, as in classification):

    raw:            s(x, c) = -mean_t e(x, c, t)
    unconditional:  s(x, c) = -mean_t [e(x, c, t) - e(x, "", t)]

The unconditional term is the empty prompt's error at the same pairs, measured once per image. It does
not change how one image ranks texts (it is a per-image constant), but it removes how easy an image is
to denoise at all, which otherwise decides which image wins a text (DiffusionITM, Krojer et al. 2023).
So ranking texts for an image uses the raw score by default and ranking images for a text the
normalised one; both come from one scoring pass.

Noise is seeded per image (its pixels and the seed), as in classification.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...adapters.denoiser import Denoiser
from ...adapters.loading import load_with_options
from ...data import image_list, preprocess
from ...engine.config import ScoringConfig
from ...engine.probabilities import mark_ties, mean_over_timesteps
from ...engine.scoring import ScoringEngine, check_robust_options, prepare_images
from ...engine.strategies import ScoreTable
from ...errors import UserError, warn_once

NORMALIZATIONS = ("none", "unconditional")
DEFAULT_NORMALIZE = {"image": "none", "text": "unconditional"}  # by: rank texts per image / images per text


def check_normalize(normalize: str) -> str:
    if normalize not in NORMALIZATIONS:
        raise UserError(f"unknown normalisation {normalize!r}; choose none or unconditional")
    return normalize


@dataclass
class ImageScores:
    """One image scored against its texts."""

    image: str
    texts: list[str]
    errors: np.ndarray  # [texts, columns], NaN where a text was pruned
    null_errors: np.ndarray | None  # [columns]: the empty prompt's error at the same pairs
    timesteps: list[int]  # the timestep of each column, in evaluation order
    nfe: int
    seconds: float
    extra: dict = field(default_factory=dict)

    def scores(self, normalize: str = "none") -> np.ndarray:
        """[texts] match scores, higher = better (NaN for a text never evaluated)."""
        if check_normalize(normalize) == "none":
            return -mean_over_timesteps(self.errors)
        if self.null_errors is None:
            raise UserError("unconditional normalisation needs the null errors (score with with_null=True)")
        return -mean_over_timesteps(self.errors - self.null_errors[None, :])

    def ranking(self, normalize: str = "none") -> list[tuple[str, float]]:
        """Texts best first: those evaluated at more timesteps (they survived pruning) first, then by score."""
        scores = self.scores(normalize)
        counts = np.isfinite(self.errors).sum(axis=1)
        order = np.lexsort((-np.nan_to_num(scores, nan=-np.inf), -counts))
        return [(self.texts[i], float(scores[i])) for i in order]


@dataclass
class Matching:
    """N images against M texts, from one scoring pass."""

    images: list[ImageScores]
    texts: list[str]

    def matrix(self, normalize: str = "none") -> np.ndarray:
        """[N, M] match scores, higher = better."""
        return np.stack([image.scores(normalize) for image in self.images])

    def by_image(self, normalize: str | None = None) -> list[list[tuple[str, float]]]:
        """Per image, the texts ranked (raw scores unless told otherwise)."""
        return [image.ranking(normalize or DEFAULT_NORMALIZE["image"]) for image in self.images]

    def by_text(self, normalize: str | None = None) -> list[list[tuple[str, float]]]:
        """Per text, the images ranked (normalised scores unless told otherwise)."""
        matrix = self.matrix(normalize or DEFAULT_NORMALIZE["text"])
        names = [image.image for image in self.images]
        return [[(names[i], float(matrix[i, j])) for i in np.argsort(-np.nan_to_num(matrix[:, j], nan=-np.inf),
                                                                     kind="stable")]
                for j in range(len(self.texts))]

    @property
    def nfe(self) -> np.ndarray:
        return np.array([image.nfe for image in self.images])

    def rankings(self, by: str = "image", normalize: str | None = None) -> list[dict]:
        """What `match` prints: per image (by="image") its texts, or per text its images, best first, each entry's
        "score" the mean denoising error (normalised: minus the empty prompt's), lower is better, as in
        classification; "timesteps" what it rests on; "tie" when it equals another entry's exactly."""
        normalize = normalize or DEFAULT_NORMALIZE[by]
        if by == "image":
            out = []
            for image, ranking in zip(self.images, self.by_image(normalize)):
                counts = dict(zip(image.texts, np.isfinite(image.errors).sum(axis=1).tolist()))
                entries = [{"text": text, "score": _error(score), "timesteps": counts[text]} for text, score in ranking]
                out.append({"image": image.image, "normalize": normalize, "nfe": image.nfe,
                            "seconds": round(image.seconds, 4), "better": "lower", "ranking": mark_ties(entries)})
            return out
        out = []
        for j, (text, ranking) in enumerate(zip(self.texts, self.by_text(normalize))):
            counts = {image.image: int(np.isfinite(image.errors[j]).sum()) for image in self.images}
            entries = [{"image": name, "score": _error(score), "timesteps": counts[name]} for name, score in ranking]
            out.append({"text": text, "normalize": normalize, "better": "lower", "ranking": mark_ties(entries)})
        return out


def _error(score: float) -> float | None:
    """A match score (higher = better) as the mean error it negates (lower = better)."""
    return None if np.isnan(score) else -float(score)


class ImageTextMatcher:
    """Scores images against texts with any text-conditioned denoiser.

    config / options: as for DiffusionClassifier (strategy, loss, seed, batch_size, ...); the strategy
    runs over the texts of each image (Elimination drops texts the paired test rules out).
    with_null: also measure the empty prompt at every pair (needed for unconditional normalisation;
    costs one more evaluation per timestep and image).
    cache_bytes / cache_size: embedded texts kept on the device for later calls, at most this many bytes (Flux's
        T5 states are 4 MiB per text) and this many texts; least recently used dropped first.
    """

    def __init__(self, denoiser: Denoiser, config: ScoringConfig | None = None, with_null: bool = True,
                 cache_size: int = 4096, cache_bytes: int = 2**30, **options):
        if denoiser.conditioning != "text":
            raise UserError("image-text matching needs a text-conditioned model; this one takes class ids")
        self.denoiser = denoiser
        self.config = config.with_options(**options) if config else ScoringConfig.from_options(**options)
        self.with_null = with_null
        check_robust_options(denoiser, self.config)
        self.engine = ScoringEngine.for_config(denoiser, None, self.config)  # each call brings its texts
        self.cache_size, self.cache_bytes = max(1, int(cache_size)), max(0, int(cache_bytes))
        self._embedded: OrderedDict[str, dict] = OrderedDict()
        self._cached_bytes = 0

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        **kwargs) -> ImageTextMatcher:
        """Load a model (built-in name, local diffusers directory, hub id, or a single-file checkpoint) and build on
        it. device and dtype "auto" are the CLI's (CUDA and bfloat16 where CUDA is); variant, lora, lora_scale,
        base_config and text_encoders go to load_denoiser, other keyword arguments to the constructor."""
        denoiser, options = load_with_options(model, device, dtype, kwargs)
        return cls(denoiser, **options)

    def describe(self) -> dict:
        """The settings that determine results (stored with evaluation runs)."""
        return {**self.config.describe(), "with_null": self.with_null, "conditioning": "text",
                "dtype": str(self.denoiser.dtype).replace("torch.", ""),
                **({"resolution": self.denoiser.scoring_resolution} if self.denoiser.scoring_resolution else {})}

    def match(self, images: Sequence, texts: Sequence[str], names: Sequence[str] | None = None) -> Matching:
        """Every image against every text: one Matching with an [N, M] score matrix."""
        texts = self.check_texts(texts)
        images = image_list(images)
        names = list(names) if names is not None else [str(im) if isinstance(im, (str, Path)) else f"#{i}"
                                                        for i, im in enumerate(images)]
        scored = []
        for start in range(0, len(images), self.config.images_per_batch):
            chunk = images[start:start + self.config.images_per_batch]
            scored += self.score_groups([(chunk, texts)], [names[start:start + len(chunk)]])[0]
        return Matching(scored, texts)

    def check_texts(self, texts: Sequence[str]) -> list[str]:
        """The texts, validated: non-empty, distinct, and distinct within what the model reads of them (a text
        longer than its text encoder keeps is cut; two texts that differ only past the cut would tie exactly,
        so ranking them would decide nothing)."""
        texts = _validate_texts(texts)
        too_long, same = self.denoiser.check_texts(texts)
        if same:
            a, b = same[0]
            raise UserError(f"texts {a!r} and {b!r} are identical within what the model reads of them (its text "
                            "encoder keeps only the first tokens), so their scores would tie exactly; shorten them "
                            "or put the words that differ first")
        for message in too_long:
            warn_once(message)
        return texts

    def score_groups(self, groups: Sequence[tuple[Sequence, Sequence[str]]],
                     names: Sequence[Sequence[str]] | None = None) -> list[list[ImageScores]]:
        """Several (images, texts) groups in one engine pass (e.g. the examples of a Winoground batch):
        each image is scored against its own group's texts, taken as given (match() and evaluate_matching check
        them with check_texts first)."""
        started = time.perf_counter()
        pixel_groups = [self._pixels(images) for images, _ in groups]
        all_texts = [t for _, texts in groups for t in texts] + ([self.denoiser.null_condition()]
                                                                 if self.with_null else [])
        bank, row_of = self._bank(all_texts)
        jobs, owners = [], []
        for g, ((_, texts), pixels) in enumerate(zip(groups, pixel_groups)):
            rows = np.array([[row_of[t]] for t in texts])
            null_row = row_of[self.denoiser.null_condition()] if self.with_null else None
            group_names = names[g] if names is not None else None
            for i, job in enumerate(prepare_images(self.denoiser, self.config, pixels, rows, null_row,
                                                   names=group_names)):
                jobs.append(job)
                owners.append((g, i))
        tables = self.engine.score(jobs, self.config.strategy, self.config.aggregate, conditions=bank)
        seconds = (time.perf_counter() - started) / max(1, len(tables))
        out: list[list[ImageScores]] = [[] for _ in groups]
        for (g, i), table in zip(owners, tables):
            texts = list(groups[g][1])
            name = names[g][i] if names is not None else f"#{g}.{i}"
            out[g].append(_image_scores(name, texts, table, seconds))
        return out

    def _pixels(self, images: Sequence) -> torch.Tensor:
        return preprocess(list(images), self.denoiser.image_size, self.denoiser.image_channels,
                          self.config.interpolation)

    def _bank(self, texts: list[str]) -> tuple[dict, dict[str, int]]:
        """Embedded conditions for these texts; texts embedded by earlier calls come from the cache."""
        distinct = list(dict.fromkeys(texts))
        rows = {t: self._embedded[t] for t in distinct if t in self._embedded}
        missing = [t for t in distinct if t not in rows]
        if missing:
            embedded = self.denoiser.embed_conditions(missing)
            for k, text in enumerate(missing):  # copies: a view would keep the whole embedded batch alive
                rows[text] = {key: value[k:k + 1].clone() for key, value in embedded.items()}
        for text in distinct:  # most recently used last; the oldest leave once the cache is full
            if text not in self._embedded:
                self._cached_bytes += sum(v.numel() * v.element_size() for v in rows[text].values())
            self._embedded[text] = rows[text]
            self._embedded.move_to_end(text)
        while self._embedded and (len(self._embedded) > self.cache_size or self._cached_bytes > self.cache_bytes):
            _, dropped = self._embedded.popitem(last=False)
            self._cached_bytes -= sum(v.numel() * v.element_size() for v in dropped.values())
        bank = {key: torch.cat([rows[t][key] for t in distinct]) for key in rows[distinct[0]]}
        return bank, {t: i for i, t in enumerate(distinct)}


def _validate_texts(texts: Sequence[str]) -> list[str]:
    texts = [str(t) for t in texts]
    if not texts:
        raise UserError("give at least one text to match (--text or --texts-file)")
    if any(not t.strip() for t in texts):
        raise UserError("texts must be non-empty (the empty prompt is the unconditional reference)")
    if len(set(texts)) != len(texts):
        raise UserError("duplicate texts")
    return texts


def _image_scores(name: str, texts: list[str], table: ScoreTable, seconds: float) -> ImageScores:
    return ImageScores(image=name, texts=texts, errors=table.errors[:, 0, :].copy(),
                       null_errors=None if table.null_errors is None else table.null_errors.copy(),
                       timesteps=list(table.timesteps), nfe=table.nfe, seconds=seconds,
                       extra={"evidence": {texts[int(k)]: why for k, why in table.evidence.items()}}
                       if table.evidence else {})
