"""Caption pairs (ARO / SugarCrepe style): one image, its true caption and a false one; accuracy."""

from __future__ import annotations

import numpy as np

from ..engine.probabilities import same_score
from .classification import ties
from .matching.examples import load_caption_pairs
from .matching.metrics import pairs_accuracy
from .matching.task import MatchingTask


class CaptionPairsTask(MatchingTask):
    name = "pairs"

    def load_items(self, run) -> list:
        examples = load_caption_pairs(run.data)
        return examples[:run.limit] if run.limit is not None else examples

    def images(self, example) -> list:
        return [example.image]

    def outcome(self, raw: np.ndarray, normalized: np.ndarray | None) -> tuple[int, bool]:
        # 0: the true caption wins; a tie (equal to TIE_RTOL) counts as a miss, as in pairs_accuracy
        prediction = int(raw[0, 1] >= raw[0, 0] or same_score(float(raw[0, 0]), float(raw[0, 1])))
        return prediction, prediction == 0

    def score_metrics(self, raw: np.ndarray, normalized: np.ndarray | None, tags: list) -> dict:
        metrics = pairs_accuracy(raw[:, 0, 0], raw[:, 0, 1])
        if any(tags):
            tags = np.array([tag or "" for tag in tags])
            metrics["by_tag"] = {tag: pairs_accuracy(raw[tags == tag, 0, 0], raw[tags == tag, 0, 1])
                                 for tag in sorted(set(tags))}
        return metrics

    def margins(self, raw: np.ndarray, normalized: np.ndarray | None) -> np.ndarray:
        return raw[:, 0, 0] - raw[:, 0, 1]

    def headline(self, m: dict) -> list[str]:
        return [f"accuracy {m['accuracy']:.4f} +- {m['accuracy_stderr']:.4f}  ({m['examples']} examples)" + ties(m)]

    def summary(self, metrics: dict, seconds: float) -> list[str]:
        return [f"accuracy {metrics['accuracy']:.4f}  examples {metrics['examples']}  "
                f"NFE/example {metrics['nfe_per_example']:.0f}" + ties(metrics)]

    def right_captions(self, n_images: int) -> np.ndarray:
        return np.zeros(n_images, dtype=int)  # the true caption comes first
