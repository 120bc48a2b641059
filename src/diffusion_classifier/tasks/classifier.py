"""The public API: a scikit-learn style classifier over any supported diffusion model."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapters.denoiser import Denoiser
from ..adapters.loading import load_with_options
from ..data import image_list, preprocess
from ..engine import probabilities
from ..engine.config import ScoringConfig
from ..engine.low_resolution import LookResult, LowResolutionLook
from ..engine.scoring import ScoringEngine, check_robust_options, prepare_images
from ..engine.strategies import ScoreTable
from ..errors import UserError, warn_once
from .labels import candidate_classes
from .presets import DatasetPreset, preset_class_ids, scoring_config
from .presets import preset as load_preset


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
    tied_with: list[str] = field(default_factory=list)  # labels whose mean error equals the prediction's exactly
    timesteps_per_label: dict[str, int] = field(default_factory=dict)  # what each mean error rests on

    def to_dict(self, top_k: int | None = None) -> dict:
        """The JSON form: "score" is a label's mean denoising error (lower is better, as "better" says)."""
        ranking = self.ranking[:top_k] if top_k else self.ranking
        counts = self.timesteps_per_label
        return {"image": self.image, "prediction": self.prediction, "tie": bool(self.tied_with),
                "tied_with": self.tied_with, "nfe": self.nfe, "seconds": round(self.seconds, 4), "better": "lower",
                "ranking": probabilities.mark_ties([{"label": label, "score": None if np.isnan(score) else float(score),
                                                     "timesteps": counts.get(label)} for label, score in ranking])}


class DiffusionClassifier:
    """Zero-shot classification by comparing a diffusion model's denoising errors across candidates.

    labels: class names. For text-conditioned models each is expanded with `templates`
        ("a photo of a {}.") into prompts, or `prompts` gives the prompts per class directly.
        For class-conditional models labels must be names from the model's saved class
        names (default: all of them) or integer class ids.
    config: a ScoringConfig; or its fields as keyword options (strategy=Exhaustive(25), loss="l2",
        aggregate="min", seed=0, batch_size=256, ...), which also override a given config.
    temperature: predict_proba is softmax(-(error - leader's error) / temperature). It is NOT
        calibrated unless the temperature was fitted on held-out data (`calibrate`). None: the
        temperature stored with the model (model_index.json "calibration") when this classifier scores
        as it was fitted (stored_temperature_applies), else 1.0 with a warning; `probability_source`
        says which ("calibrated", "given" or "not calibrated").
    timestep_weights: per-timestep weights from `calibrate --per-timestep` instead of a temperature.
    calibration: what `calibrate` fitted (calibration.read_calibration: temperature, timestep_weights, fitted_on);
        like the model's stored temperature it is used only for the scoring settings it was fitted at (else an
        error), and probabilities then say "calibrated".
    preset: a dataset preset (name or `preset(name)`): its class names and the paper's prompts unless labels,
        templates or prompts are given, and its staged schedule and loss unless a strategy or loss is
        (class-conditional models take only the schedule and loss).
    """

    def __init__(self, denoiser: Denoiser, labels: Sequence[str | int] | None = None,
                 templates: Sequence[str] | None = None, prompts: Sequence[Sequence[str]] | None = None,
                 config: ScoringConfig | None = None, temperature: float | None = None,
                 timestep_weights: dict[int, float] | None = None, preset: str | DatasetPreset | None = None,
                 calibration: dict | None = None, **options):
        self.denoiser = denoiser
        if preset is not None:
            preset = load_preset(preset)
            if denoiser.conditioning == "text" and prompts is None:
                labels, prompts = preset.candidates(labels, templates)
                templates = None
            elif denoiser.conditioning != "text" and labels is None:  # its own classes, or refused, not renamed
                labels = preset_class_ids(preset, denoiser)
        self.config = config.with_options(**options) if config else scoring_config(preset, **options)
        budget, available = self.config.strategy.timestep_budget(), denoiser.num_train_timesteps
        if budget > available:
            raise UserError(f"the strategy scores up to {budget} timesteps per candidate, but this model has "
                            f"{available}")
        if calibration is not None:
            if temperature is not None or timestep_weights is not None:
                raise UserError("give a calibration or a temperature / timestep weights, not both")
            reason = stored_temperature_applies(calibration, self.config) if calibration.get("fitted_on") else None
            if reason is not None:
                raise UserError(f"the calibration does not hold for these settings: {reason} (fit one for them with "
                                "evaluate + calibrate)")
            temperature, timestep_weights = calibration["temperature"], calibration.get("timestep_weights")
        self.timestep_weights = dict(timestep_weights) if timestep_weights else None
        self._calibration_warning = None  # said when probabilities are first computed, not by runs that show none
        if calibration is not None:  # checked for these settings only when it says what they were
            self.probability_source = "calibrated" if calibration.get("fitted_on") else "given"
        elif self.timestep_weights or temperature is not None:
            self.probability_source = "calibrated" if self.timestep_weights else "given"
        else:
            reason = stored_temperature_applies(denoiser.info.calibration, self.config)
            self.probability_source = "calibrated" if reason is None else "not calibrated"
            temperature = float(denoiser.info.temperature) if reason is None else 1.0
            if reason is not None and denoiser.info.calibration:
                self._calibration_warning = (f"probabilities are not calibrated: {reason}; the model's stored "
                                             "temperature does not apply (fit one for these settings with evaluate "
                                             "+ calibrate)")
        if temperature <= 0:
            raise UserError("temperature must be positive")
        self.temperature = temperature
        check_robust_options(denoiser, self.config)
        self.classes_, conditions = candidate_classes(denoiser, labels, templates, prompts)
        extra = self.config.strategy.extra_candidates()  # coarse candidates: scored, never ranked
        if extra:
            if prompts is not None:
                raise UserError("coarse candidates are expanded with templates; give labels and templates, not prompts")
            names, extra_conditions = candidate_classes(denoiser, extra, templates, None)
            if set(names) & set(self.classes_):
                raise UserError(f"coarse candidate {sorted(set(names) & set(self.classes_))[0]!r} is also a class")
            conditions = list(conditions) + list(extra_conditions)
            self.strategy = self.config.strategy.resolve(self.classes_ + names)
        else:
            self.strategy = self.config.strategy.resolve(self.classes_)
        if denoiser.conditioning == "text":
            self.prompts_ = conditions[:len(self.classes_)]
            flat = [c for per_class in conditions for c in per_class]
            too_long, same = denoiser.check_texts(flat)
            for message in too_long:
                warn_once(message)
            for a, b in same:
                warn_once(f"prompts {a!r} and {b!r} are identical within what the model reads of them, so their "
                          "classes tie exactly (a tie is reported, never a decision)")
            self._rows = np.arange(len(flat)).reshape(len(conditions), len(conditions[0]))
        else:
            self.prompts_, flat = None, conditions
            self._rows = np.arange(len(flat)).reshape(-1, 1)
        self.engine = ScoringEngine.for_config(denoiser, denoiser.embed_conditions(flat), self.config)
        look = self.strategy.low_resolution_look()
        self._look = None if look is None else LowResolutionLook(denoiser, self.engine.conditions, self.config, look)

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
                        **kwargs) -> DiffusionClassifier:
        """Load a model (built-in name, local diffusers directory, hub id, or a single-file checkpoint) and build on
        it. device and dtype "auto" are the CLI's (CUDA and bfloat16 where CUDA is); variant, lora, lora_scale,
        base_config and text_encoders go to load_denoiser, other keyword arguments to the constructor."""
        denoiser, options = load_with_options(model, device, dtype, kwargs)
        return cls(denoiser, **options)

    # ----- scikit-learn style verbs ------------------------------------------------
    def classify(self, images: Sequence, names: Sequence[str] | None = None,
                 noise: Sequence[torch.Tensor | None] | None = None) -> list[Classification]:
        """Classify images (PIL images, paths, HxW / HxWxC / CxHxW arrays or tensors; one of them alone is one
        image); returns one rich result per image."""
        images = image_list(images)
        names = list(names) if names is not None else [str(im) if isinstance(im, (str, Path)) else f"#{i}"
                                                        for i, im in enumerate(images)]
        results = []
        for start in range(0, len(images), self.config.images_per_batch):
            chunk = images[start:start + self.config.images_per_batch]
            started = time.perf_counter()
            pixels = preprocess(chunk, self.denoiser.image_size, self.denoiser.image_channels,
                                self.config.interpolation)
            chunk_noise = None if noise is None else noise[start:start + len(chunk)]
            results.extend(self.classify_pixels(pixels, names[start:start + len(chunk)], chunk_noise, started))
        return results

    def classify_pixels(self, pixels: torch.Tensor, names: Sequence[str], noise=None,
                        started: float | None = None) -> list[Classification]:
        """Classify preprocessed images ([B, C, H, W] in [-1, 1])."""
        started = time.perf_counter() if started is None else started
        jobs = prepare_images(self.denoiser, self.config, pixels, self._rows, noise=noise, names=names)
        looks: list[LookResult | None] = [None] * len(jobs)
        if self._look is not None:  # a first look at a lower resolution picks the candidates the rounds start from
            looks = self._look.run(pixels, self._rows, names)
            for job, look in zip(jobs, looks):
                job.candidates = look.shortlist
        tables = self.engine.score(jobs, self.strategy, self.config.aggregate)
        seconds = (time.perf_counter() - started) / max(1, len(tables))
        return [self._result(name, table, seconds, look) for name, table, look in zip(names, tables, looks)]

    def _result(self, name: str, table: ScoreTable, seconds: float, look: LookResult | None = None) -> Classification:
        n = len(self.classes_)  # rows past the classes are coarse candidates: they count in the NFE only
        extra = {}
        if look is not None:  # its evaluations count in the NFE (said apart: each is cheaper), its verdicts as evidence
            table.evidence.update(look.evidence)
            extra["nfe_low_resolution"] = look.nfe
        if table.evidence:
            extra["evidence"] = {self.classes_[int(c)]: why for c, why in table.evidence.items() if c < n}
        errors = table.errors[:n]
        scores = probabilities.class_scores(errors, self.config.aggregate)
        order = probabilities.ranking(errors, self.config.aggregate)
        counts = np.isfinite(errors[:, 0, :]).sum(axis=1)
        tied = [self.classes_[i] for i in itertools.takewhile(  # ranked, so the ties follow the leader
            lambda i: counts[i] == counts[order[0]] and probabilities.same_score(scores[i], scores[order[0]]),
            order[1:])]
        return Classification(image=name, prediction=self.classes_[order[0]], prediction_index=int(order[0]),
                              ranking=[(self.classes_[i], float(scores[i])) for i in order], mean_errors=scores,
                              errors=errors.copy(), timesteps=list(table.timesteps),
                              nfe=table.nfe + (look.nfe if look else 0), seconds=seconds, extra=extra,
                              tied_with=tied, timesteps_per_label={c: int(n) for c, n in zip(self.classes_, counts)})

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
        if self._calibration_warning:
            warn_once(self._calibration_warning)
        if self.timestep_weights:
            return np.stack([self._weighted_probabilities(r) for r in results])
        relative = np.stack([probabilities.relative_scores(r.errors, r.prediction_index, self.config.aggregate)
                             for r in results])
        return probabilities.softmax_of_errors(relative, self.temperature)

    def _weighted_probabilities(self, result: Classification) -> np.ndarray:
        if sorted(result.timesteps) != sorted(self.timestep_weights):
            raise UserError(f"the per-timestep calibration was fitted at timesteps {sorted(self.timestep_weights)}; "
                            f"this strategy evaluated {sorted(result.timesteps)}: use the same exhaustive strategy")
        gaps = probabilities.timestep_gaps(result.errors, result.timesteps, result.prediction_index,
                                        self.config.aggregate)
        weights = np.array([self.timestep_weights[t] for t in sorted(result.timesteps)])
        return probabilities.weighted_probabilities(gaps, weights)

    def describe(self) -> dict:
        """The settings that determine results (stored with evaluation runs)."""
        return {"labels": list(self.classes_), "prompts": self.prompts_, **self.config.describe(),
                "strategy": self.strategy.describe(), "conditioning": self.denoiser.conditioning,
                "dtype": str(self.denoiser.dtype).replace("torch.", ""),
                **({"resolution": self.denoiser.scoring_resolution} if self.denoiser.scoring_resolution else {})}


# A stored temperature holds for the scoring settings it was fitted with, and for a timestep count within this
# factor of the fitted one (the gaps' scale does not depend on the count; their noise does, mildly).
TIMESTEP_RANGE = 4
FITTED_DEFAULTS = {"loss": "l2", "target": "eps", "grid": "even", "weighting": "uniform", "aggregate": "min"}


def stored_temperature_applies(calibration: dict | None, config: ScoringConfig) -> str | None:
    """None when a model's stored calibration holds for `config`; else why not (a short phrase)."""
    if not calibration or not calibration.get("temperature"):
        return "the model carries no fitted temperature"
    fitted = calibration.get("fitted_on", {})
    settings = {**FITTED_DEFAULTS, **{k: v for k, v in fitted.get("scoring", {}).items() if v is not None}}
    for name, value in settings.items():
        if getattr(config, name) != value:
            return f"it was fitted with {name} {value}, this run uses {getattr(config, name)}"
    fitted_count = (ScoringConfig.from_description(fitted).strategy.timestep_budget() if fitted.get("strategy")
                    else 0)
    count = config.strategy.timestep_budget()
    low, high = -(-fitted_count // TIMESTEP_RANGE), fitted_count * TIMESTEP_RANGE  # ceil, so the range is exact
    if fitted_count and not low <= count <= high:
        return (f"it was fitted at {fitted_count} timesteps and holds for {low} to {high}; this run scores at up "
                f"to {count}")
    return None
