"""From error matrices to scores, rankings and probabilities: pure numpy, no model, no I/O.

An error matrix is errors[candidate, prompt, column] (NaN where not evaluated); each column is one
(t, eps) pair shared by every candidate evaluated there. A candidate's score is its mean error over its
evaluated columns, with its prompts combined by `min` (the paper) or `mean`.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError

AGGREGATES = ("min", "mean")


def check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise UserError(f"unknown prompt aggregation {aggregate!r}; choose min or mean")
    return aggregate


def combine_prompts(values: np.ndarray, aggregate: str = "min") -> np.ndarray:
    """[candidates, prompts, ...] -> [candidates, ...]: min or mean over the prompt axis."""
    check_aggregate(aggregate)
    return values.min(axis=1) if aggregate == "min" else values.mean(axis=1)


def mean_over_timesteps(errors: np.ndarray) -> np.ndarray:
    """Mean over the evaluated (finite) columns of the last axis; NaN where none was evaluated."""
    counts = np.isfinite(errors).sum(axis=-1)
    sums = np.nansum(errors, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def class_scores(errors: np.ndarray, aggregate: str = "min") -> np.ndarray:
    """[candidates]: mean error over evaluated timesteps per (candidate, prompt), prompts combined."""
    return combine_prompts(mean_over_timesteps(errors), aggregate)


def ranking(errors: np.ndarray, aggregate: str = "min") -> np.ndarray:
    """Candidate indices best first: candidates evaluated at more timesteps (they survived pruning) first,
    then by lower score."""
    scores = np.nan_to_num(class_scores(errors, aggregate), nan=np.inf)
    counts = np.isfinite(errors[:, 0, :]).sum(axis=1)
    return np.lexsort((scores, -counts))


def per_timestep_errors(errors: np.ndarray, aggregate: str = "min") -> np.ndarray:
    """[candidates, columns]: each candidate's error per column, prompts combined."""
    return combine_prompts(errors, aggregate)


def relative_scores(errors: np.ndarray, leader: int, aggregate: str = "min") -> np.ndarray:
    """Each candidate's mean error minus the leader's on the same timesteps: [candidates] (inf: none shared).

    With pruning, candidates are evaluated at different timestep sets, and mean errors depend strongly on
    t; comparing each with the leader on its own timesteps keeps probabilities consistent. For exhaustive
    runs this equals mean error minus the leader's (softmax is shift-invariant).
    """
    out = np.full(errors.shape[0], np.inf)
    for c in range(errors.shape[0]):
        columns = np.isfinite(errors[c, 0]) & np.isfinite(errors[leader, 0])
        if not columns.any():
            continue
        scores = combine_prompts(errors[:, :, columns].mean(axis=2), aggregate)
        out[c] = scores[c] - scores[leader]
    return out


def timestep_gaps(errors: np.ndarray, timesteps: list[int], leader: int, aggregate: str = "min") -> np.ndarray:
    """[candidates, timesteps sorted]: each candidate's error minus the leader's at each timestep.

    Needs every candidate at every timestep (an exhaustive run); per-timestep weights are defined on those.
    """
    per_t = per_timestep_errors(errors, aggregate)
    if np.isnan(per_t).any():
        raise UserError("per-timestep calibration needs every class scored at every timestep (an exhaustive "
                        "strategy); this run pruned classes")
    order = np.argsort(timesteps)
    return (per_t - per_t[leader])[:, order]


def softmax_of_errors(errors: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise softmax of -errors / temperature (inf errors get probability 0)."""
    logits = -errors / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def weighted_probabilities(gaps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """softmax(-sum_t w_t gap[..., c, t]) over candidates."""
    scores = (gaps * weights).sum(axis=-1)
    return softmax_of_errors(scores.reshape(-1, scores.shape[-1]), 1.0).reshape(scores.shape)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true label), clipped at 1e-12."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-1 ECE: sum over confidence bins of |accuracy - confidence| weighted by the bin's share."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


# Scores this close are one score: candidates the model cannot tell apart (identical conditions) differ only by
# float rounding between batch positions (~1e-7); different candidates differ by far more.
TIE_RTOL = 1e-6


def same_score(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and math.isclose(a, b, rel_tol=TIE_RTOL)


def mark_ties(entries: list[dict]) -> list[dict]:
    """Ranked entries ({"score", "timesteps", ...}, best first): "tie" set where a score equals a neighbour's (to
    TIE_RTOL) over as many timesteps: a tie, never a decision between them. Sorted, so neighbours suffice."""
    def tied(a: dict, b: dict) -> bool:
        return a["timesteps"] == b["timesteps"] and same_score(a["score"], b["score"])

    for k, entry in enumerate(entries):
        entry["tie"] = (k > 0 and tied(entries[k - 1], entry)) or (k + 1 < len(entries) and tied(entry, entries[k + 1]))
    return entries
