"""The public API: a scikit-learn style classifier over any supported diffusion model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import robust
from .data import preprocess
from .denoisers import LOSSES, Denoiser, load_denoiser
from .errors import UserError
from .labels import expand_prompts, validate_labels, validate_templates
from .runtime import tune_cpu_allocator
from .scoring import ScoringEngine, image_seed
from .strategies import Exhaustive, ScoreTable, Strategy, relative_scores


def softmax_of_errors(errors: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of -errors / temperature (inf errors get probability 0)."""
    logits = -errors / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


@dataclass
class Classification:
    """Everything measured for one image."""

    image: str
    prediction: str
    prediction_index: int
    ranking: list[tuple[str, float]]  # (label, mean error), best first
    mean_errors: np.ndarray  # [n_classes], mean error per class (NaN: never evaluated)
    errors: np.ndarray  # [n_classes, n_prompts, n_timesteps_evaluated], NaN where pruned
    timesteps: list[int]  # the timestep of each column of `errors`, in evaluation order
    nfe: int  # network evaluations spent on this image
    seconds: float  # wall time attributed to this image (its share of its batch)
    extra: dict = field(default_factory=dict)

    def to_dict(self, top_k: int | None = None) -> dict:
        ranking = self.ranking[:top_k] if top_k else self.ranking
        return {"image": self.image, "prediction": self.prediction, "nfe": self.nfe,
                "seconds": round(self.seconds, 4),
                "ranking": [{"label": label, "score": None if np.isnan(score) else float(score)}
                            for label, score in ranking]}


class DiffusionClassifier:
    """Zero-shot classification by comparing a diffusion model's denoising errors across candidates.

    labels: class names. For text-conditioned models each is expanded with `templates`
        ("a photo of a {}.") into prompts, or `prompts` gives the prompts per class directly.
        For class-conditional models labels must be names from the model's saved class
        names (default: all of them) or integer class ids.
    strategy: Exhaustive(n_timesteps), Staged(n_samples, to_keep) or preset(name).
    loss: l2 (default), l1 or huber, on the noise. aggregate: min or mean over prompts.
    temperature: predict_proba is softmax(-(error - leader's error) / temperature). It is NOT
        calibrated unless the temperature was fitted on held-out data (`calibrate`). None: the
        temperature stored with the model (model_index.json "calibration"), else 1.0.
    """

    def __init__(self, denoiser: Denoiser, labels: Sequence[str | int] | None = None,
                 templates: Sequence[str] | None = None, prompts: Sequence[Sequence[str]] | None = None,
                 strategy: Strategy | None = None, loss: str | None = None, aggregate: str = "min",
                 seed: int = 0, batch_size: int = 256, temperature: float | None = None,
                 interpolation: str = "bicubic", images_per_batch: int = 32, noise_aware: bool = False,
                 normalize_intensity: bool = False, noise_margin: float = 2.0,
                 timestep_weights: dict[int, float] | None = None):
        self.denoiser = denoiser
        self.strategy = strategy or Exhaustive(25)
        self.loss = loss or self.strategy.loss or "l2"
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if aggregate not in ("min", "mean"):
            raise UserError(f"unknown prompt aggregation {aggregate!r}; choose min or mean")
        if temperature is None:
            temperature = float(denoiser.extra_config.get("calibration", {}).get("temperature", 1.0))
        if temperature <= 0:
            raise UserError("temperature must be positive")
        if noise_margin <= 0:
            raise UserError("the noise margin must be positive")
        self.aggregate, self.seed, self.batch_size = aggregate, seed, batch_size
        self.temperature, self.interpolation, self.images_per_batch = temperature, interpolation, images_per_batch
        self.timestep_weights = dict(timestep_weights) if timestep_weights else None
        self.noise_aware, self.normalize_intensity, self.noise_margin = noise_aware, normalize_intensity, noise_margin
        if noise_aware and denoiser.vae is not None:
            raise UserError("noise-aware scoring is defined for pixel-space models; for latent models (Stable "
                            "Diffusion, DiT) the pixel noise level does not map to a latent one (see README)")
        if normalize_intensity and not denoiser.extra_config.get("intensity_stats"):
            raise UserError("this model has no stored intensity statistics, so it cannot normalise intensities")
        self.classes_, conditions = self._candidates(labels, templates, prompts)
        self.strategy = self.strategy.resolve(self.classes_)
        self.prompts_ = conditions if denoiser.conditioning == "text" else None
        n_prompts = len(conditions[0]) if denoiser.conditioning == "text" else 1
        flat = [c for per_class in conditions for c in per_class] if denoiser.conditioning == "text" else conditions
        embedded = denoiser.embed_conditions(flat)
        self.engine = ScoringEngine(denoiser, embedded, len(self.classes_), n_prompts, self.strategy,
                                    self.loss, aggregate, seed, batch_size)

    def _candidates(self, labels, templates, prompts):
        denoiser = self.denoiser
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
            raise UserError("templates and prompts apply to text-conditioned models; this model takes class ids")
        names = denoiser.class_names or [str(i) for i in range(denoiser.num_classes)]
        if labels is None:
            return list(names), list(range(len(names)))
        lookup: dict[str, int] = {}  # full names, and each comma-separated synonym (ImageNet's "tench, Tinca tinca")
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
        bad = [i for i in ids if not 0 <= i < denoiser.num_classes]
        if bad:
            raise UserError(f"class id {bad[0]} is outside the model's {denoiser.num_classes} classes")
        return [names[i] if i < len(names) else str(i) for i in ids], ids

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> DiffusionClassifier:
        """Load a model (built-in name, local diffusers directory or hub id) and build a classifier."""
        return cls(load_denoiser(model, device=device, dtype=dtype), **kwargs)

    # ----- scikit-learn style verbs ------------------------------------------------
    def classify(self, images: Sequence, names: Sequence[str] | None = None,
                 noise: Sequence[torch.Tensor | None] | None = None) -> list[Classification]:
        """Classify images (PIL, paths, arrays or tensors); returns one rich result per image."""
        tune_cpu_allocator()
        images = list(images)
        names = list(names) if names is not None else [str(im) if isinstance(im, (str, Path)) else f"#{i}"
                                                        for i, im in enumerate(images)]
        results = []
        for start in range(0, len(images), self.images_per_batch):
            chunk = images[start:start + self.images_per_batch]
            started = time.perf_counter()
            pixels = preprocess(chunk, self.denoiser.resolution, self.denoiser.image_channels, self.interpolation)
            chunk_noise = None if noise is None else noise[start:start + len(chunk)]
            results.extend(self.classify_pixels(pixels, names[start:start + len(chunk)], chunk_noise, started))
        return results

    def classify_pixels(self, pixels: torch.Tensor, names: Sequence[str], noise=None,
                        started: float | None = None) -> list[Classification]:
        """Classify preprocessed images ([B, C, H, W] in [-1, 1])."""
        started = time.perf_counter() if started is None else started
        if self.normalize_intensity:
            pixels = robust.normalize_intensity(pixels, self.denoiser.extra_config["intensity_stats"])
        seeds = [self._seed_for(p) for p in pixels]  # of what the model scores: same pixels, same noise
        t_mins = None
        if self.noise_aware:  # after normalisation: the level the model sees
            sigma = robust.estimate_noise_sigma(pixels)
            t_mins = robust.min_timestep_for(sigma, self.denoiser.alphas_cumprod, self.noise_margin).tolist()
        x0 = self.denoiser.encode_images(pixels)
        tables = self.engine.score(x0, noise=noise, seeds=seeds, t_mins=t_mins)
        seconds = (time.perf_counter() - started) / max(1, len(tables))
        return [self._result(name, table, seconds) for name, table in zip(names, tables)]

    def _seed_for(self, pixels: torch.Tensor) -> int:
        return image_seed(self.seed, pixels)

    def _result(self, name: str, table: ScoreTable, seconds: float) -> Classification:
        scores = table.class_scores(self.aggregate)
        order = table.ranking(self.aggregate)
        return Classification(image=name, prediction=self.classes_[order[0]], prediction_index=int(order[0]),
                              ranking=[(self.classes_[i], float(scores[i])) for i in order], mean_errors=scores,
                              errors=table.errors.copy(), timesteps=list(table.timesteps), nfe=table.nfe,
                              seconds=seconds, extra={"evidence": table.evidence} if table.evidence else {})

    def predict(self, images: Sequence) -> np.ndarray:
        """Predicted labels, one per image."""
        return np.array([r.prediction for r in self.classify(images)], dtype=object)

    def predict_proba(self, images: Sequence) -> np.ndarray:
        """[n_images, n_classes] softmax(-mean error / temperature), columns in `classes_` order."""
        return self.probabilities(self.classify(images))

    def probabilities(self, results: Sequence[Classification]) -> np.ndarray:
        """softmax(-(error - leader's error on the same timesteps) / temperature) per image."""
        if not results:
            return np.zeros((0, len(self.classes_)))
        if self.timestep_weights:
            return np.stack([self._weighted_probabilities(r) for r in results])
        relative = np.stack([relative_scores(r.errors, r.prediction_index, self.aggregate) for r in results])
        return softmax_of_errors(relative, self.temperature)

    def _weighted_probabilities(self, result: Classification) -> np.ndarray:
        from .calibration import timestep_gaps, weighted_probabilities

        if sorted(result.timesteps) != sorted(self.timestep_weights):
            raise UserError(f"the per-timestep calibration was fitted at timesteps {sorted(self.timestep_weights)}; "
                            f"this strategy evaluated {sorted(result.timesteps)}: use the same exhaustive strategy")
        gaps = timestep_gaps(result.errors, result.timesteps, result.prediction_index, self.aggregate)
        weights = np.array([self.timestep_weights[t] for t in sorted(result.timesteps)])
        return weighted_probabilities(gaps, weights)

    def describe(self) -> dict:
        """The settings that determine results (stored with evaluation runs)."""
        return {"labels": list(self.classes_), "prompts": self.prompts_, "strategy": self.strategy.describe(),
                "loss": self.loss, "aggregate": self.aggregate, "seed": self.seed,
                "interpolation": self.interpolation, "conditioning": self.denoiser.conditioning,
                "noise_aware": self.noise_aware, "normalize_intensity": self.normalize_intensity,
                "dtype": str(self.denoiser.dtype).replace("torch.", "")}
