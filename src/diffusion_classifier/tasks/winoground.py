"""Winoground (Thrush et al. 2022): two images and two captions per example; text, image and group scores."""

from __future__ import annotations

import numpy as np

from .matching.examples import load_winoground
from .matching.metrics import winoground_outcomes, winoground_scores
from .matching.task import MatchingTask


class WinogroundTask(MatchingTask):
    name = "winoground"
    images_per_example = 2
    options = ("normalize",)

    def load_items(self, run) -> list:
        examples = load_winoground(run.data)
        return examples[:run.limit] if run.limit is not None else examples

    def with_null(self, run) -> bool:
        return run.normalize != "none"  # the empty prompt's errors normalise the image score

    def images(self, example) -> list:
        return list(example.images)

    def outcome(self, raw: np.ndarray, normalized: np.ndarray | None) -> tuple[None, bool]:
        image_scores = normalized if normalized is not None else raw
        return None, bool(winoground_outcomes(raw[None], image_scores[None])["group"][0])

    def score_metrics(self, raw: np.ndarray, normalized: np.ndarray | None, tags: list) -> dict:
        """The image score uses the normalised scores where the empty prompt was scored (the run's
        --normalize: none scores no empty prompt); the text score the raw ones."""
        use = "unconditional" if normalized is not None else "none"
        image = normalized if normalized is not None else raw
        metrics = {**winoground_scores(raw, image, tags), "image_normalize": use}
        if normalized is not None:  # both image scores, so the effect of normalisation is in every report
            plain = winoground_scores(raw, raw)
            metrics.update(image_score_unnormalized=plain["image_score"],
                           group_score_unnormalized=plain["group_score"])
        return metrics

    def margins(self, raw: np.ndarray, normalized: np.ndarray | None) -> np.ndarray:
        image = normalized if normalized is not None else raw
        text = np.minimum(raw[:, 0, 0] - raw[:, 0, 1], raw[:, 1, 1] - raw[:, 1, 0])
        by_image = np.minimum(image[:, 0, 0] - image[:, 1, 0], image[:, 1, 1] - image[:, 0, 1])
        return np.minimum(text, by_image)

    def headline(self, m: dict) -> list[str]:
        def score(key):
            se = m.get(f"{key}_score_stderr")
            return f"{key} {m[f'{key}_score']:.4f}" + (f" +- {se:.4f}" if se is not None else "")

        line = f"{score('text')}  {score('image')}  {score('group')}  ({m['examples']} examples)"
        return [line + (f"  image score normalised: {m['image_normalize']}" if "image_normalize" in m else "")]

    def summary(self, metrics: dict, seconds: float) -> list[str]:
        lines = [f"text {metrics['text_score']:.4f}  image {metrics['image_score']:.4f}  group "
                 f"{metrics['group_score']:.4f}  (image score normalised: {metrics['image_normalize']})  "
                 f"examples {metrics['examples']}  NFE/example {metrics['nfe_per_example']:.0f}"]
        for tag, row in metrics.get("by_tag", {}).items():
            lines.append(f"  {tag or '(no tag)'}: text {row['text_score']:.4f}  image {row['image_score']:.4f}  "
                         f"group {row['group_score']:.4f}  ({row['examples']} examples)")
        return lines

    def right_captions(self, n_images: int) -> np.ndarray:
        return np.arange(n_images)  # image i's caption is caption i
