"""Scores of image-text matching benchmarks, from match-score matrices (higher = better).

Winoground (Thrush et al. 2022), per example with images i0, i1, captions c0, c1 and scores s[image, caption]:
  text  = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)   (each image prefers its own caption)
  image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)   (each caption prefers its own image)
  group = text and image.
Chance is 25 / 25 / 16.7%. Comparisons are strict: a tie counts as a failure, as in the reference code.
Standard errors are binomial, sqrt(p (1 - p) / n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...engine.probabilities import TIE_RTOL
from ...errors import UserError
from ...stats import standard_error


def binomial_error(correct: np.ndarray) -> float:
    return standard_error(correct, ddof=0)


def winoground_outcomes(text_scores: np.ndarray, image_scores: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per example: text, image and group correctness. Scores are [examples, 2 images, 2 captions];
    `image_scores` (default: the same) may be normalised differently from `text_scores`."""
    t = np.asarray(text_scores, dtype=float)
    i = t if image_scores is None else np.asarray(image_scores, dtype=float)
    if t.ndim != 3 or t.shape[1:] != (2, 2) or i.shape != t.shape:
        raise UserError(f"Winoground scores must be [examples, 2, 2]; got {t.shape} and {i.shape}")
    text = (t[:, 0, 0] > t[:, 0, 1]) & (t[:, 1, 1] > t[:, 1, 0])
    image = (i[:, 0, 0] > i[:, 1, 0]) & (i[:, 1, 1] > i[:, 0, 1])
    return {"text": text, "image": image, "group": text & image}


def _summary(outcomes: dict[str, np.ndarray]) -> dict:
    out = {"examples": int(len(outcomes["text"]))}
    for key, correct in outcomes.items():
        out[f"{key}_score"] = float(np.mean(correct)) if len(correct) else None
        out[f"{key}_score_stderr"] = binomial_error(correct)
    return out


def winoground_scores(text_scores: np.ndarray, image_scores: np.ndarray | None = None,
                      tags: Sequence[str | None] | None = None) -> dict:
    """text_score, image_score, group_score (with standard errors) overall and per tag."""
    outcomes = winoground_outcomes(text_scores, image_scores)
    result = _summary(outcomes)
    if tags is not None and any(tag for tag in tags):
        tags = np.array([tag or "" for tag in tags])
        result["by_tag"] = {tag: _summary({k: v[tags == tag] for k, v in outcomes.items()})
                            for tag in sorted(set(tags))}
    return result


def pairs_accuracy(true_scores: np.ndarray, false_scores: np.ndarray) -> dict:
    """Share of images whose true caption scores strictly above the false one (ARO / SugarCrepe); a tie (equal to
    TIE_RTOL: captions the model cannot tell apart) is a miss, and counted in "ties"."""
    true_scores, false_scores = np.asarray(true_scores, dtype=float), np.asarray(false_scores, dtype=float)
    ties = np.isclose(true_scores, false_scores, rtol=TIE_RTOL, atol=0.0)
    correct = (true_scores > false_scores) & ~ties
    return {"accuracy": float(correct.mean()) if len(correct) else None, "accuracy_stderr": binomial_error(correct),
            "examples": int(len(correct)), "ties": int(ties.sum())}
