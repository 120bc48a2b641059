"""A first look for many candidates: a few informative timesteps for every candidate, then a shortlist.

With hundreds of candidates most of the cost of elimination is its first round (every candidate at
min_timesteps timesteps of an even grid), although a couple of well-chosen timesteps already put the
exhaustive winner among a handful of candidates. `fit_first_look` learns both choices from held-out
images scored exhaustively on the grid:

* the timesteps: chosen greedily on half of the images to make the shortlist smallest (where the class
  information is, rather than the middle of an even grid);
* the shortlist: candidates whose mean error over those timesteps is within a relative gap `max_gap` of
  the best one. `max_gap` is the conformal quantile of the exhaustive winner's gap on the other half,
  so on new images exchangeable with them the winner is kept with probability at least 1 - miss_rate
  (split conformal prediction), and an easy image gets a short list, a hard one a longer one.

Elimination(first_look=...) runs it as its first round.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..adapters.schedules import even_subset
from ..errors import UserError
from . import probabilities


@dataclass(frozen=True)
class FirstLook:
    timesteps: tuple[int, ...]
    max_gap: float  # keep candidates with (score - best) / best <= max_gap
    miss_rate: float  # the chance, promised on exchangeable images, of leaving out the exhaustive winner
    grid: int  # points of the even grid the winner was defined on (and the timesteps lie on)
    fitted_on: int  # held-out images
    held_out_shortlist: float  # mean shortlist size on those images
    resolution: int | None = None  # pixels per side it scores at (latent models; None: the model's own)

    def __post_init__(self):
        if not self.timesteps or not 0 < self.miss_rate < 1 or not self.max_gap >= 0:
            raise UserError("a first look needs timesteps, a miss rate in (0, 1) and a non-negative max_gap")
        if self.resolution is not None and self.resolution < 1:
            raise UserError("a first look's resolution must be a positive number of pixels")

    def timesteps_on(self, grid: Sequence[int]) -> list[int]:
        """Its timesteps, each moved to the nearest point of `grid` (they lie on it when the grids agree)."""
        points = np.asarray(grid)
        snapped = [int(points[np.abs(points - t).argmin()]) for t in self.timesteps]
        return list(dict.fromkeys(snapped))

    def shortlist(self, table, alive: list[int], aggregate: str = "min") -> list[int]:
        """The candidates of `alive` within max_gap of the best, scored on what `table` holds so far."""
        gaps = gaps_to_best(table.class_scores(aggregate)[alive])
        for c, gap in zip(alive, gaps):
            if gap > self.max_gap:
                table.evidence[int(c)] = {"eliminated": True, "by": "first look", "relative_gap": float(gap)}
        return [c for c, gap in zip(alive, gaps) if gap <= self.max_gap]

    def to_dict(self) -> dict:
        return {**asdict(self), "timesteps": list(self.timesteps)}

    @classmethod
    def from_dict(cls, data: dict) -> FirstLook:
        try:
            return cls(**{**data, "timesteps": tuple(int(t) for t in data["timesteps"])})
        except (TypeError, KeyError) as exc:
            raise UserError(f"not a first look: {exc}") from None

    def save(self, path: str | Path) -> None:
        from ..runtime import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> FirstLook:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the first look {path}: {exc}") from None


def conformal_quantile(scores: np.ndarray, miss_rate: float) -> float:
    """The split-conformal threshold: a new exchangeable score is at most it with probability >= 1 - miss_rate."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1 - miss_rate))
    return float("inf") if rank > n else float(np.sort(scores)[rank - 1])


def per_timestep(errors: np.ndarray, aggregate: str = "min") -> np.ndarray:
    """[images, candidates, prompts, grid] or [images, candidates, grid] -> [images, candidates, grid]."""
    errors = np.asarray(errors, dtype=float)
    if errors.ndim == 3:
        return errors
    return np.stack([probabilities.per_timestep_errors(e, aggregate) for e in errors])


def gaps_to_best(scores: np.ndarray) -> np.ndarray:
    """Each score's gap to the best along the last axis, relative to the best: the yardstick of the first look's
    and the cascade's shortlists."""
    best = scores.min(axis=-1, keepdims=True)
    return (scores - best) / np.maximum(np.abs(best), 1e-30)


def relative_gaps(errors: np.ndarray, columns: Sequence[int]) -> np.ndarray:
    """[images, candidates]: each candidate's mean error over `columns` relative to the image's best one."""
    return gaps_to_best(errors[:, :, list(columns)].mean(axis=2))


def fit_first_look(errors: np.ndarray, timesteps: Sequence[int], n_timesteps: int = 2, miss_rate: float = 0.02,
                   aggregate: str = "min", winners: Sequence[int] | None = None,
                   resolution: int | None = None) -> FirstLook:
    """Fit a first look on held-out images scored exhaustively at `timesteps` (an even grid).

    errors: [images, candidates, grid] (or with a prompts axis before the grid). The exhaustive winner of each
    image is its lowest mean error over the grid, or `winners` where given: a first look at a lower
    `resolution` is fitted on errors scored at that resolution against the winners of exhaustive scoring at
    the model's own (where its promise is about). The images are split in two: on every other image timesteps
    are added greedily, each time the one that makes the mean shortlist smallest at the conformal threshold;
    the threshold itself is then set on the other half, which took no part in choosing, so the conformal
    promise holds (choosing and calibrating on the same images makes the threshold optimistic). Only gaps
    within an image are compared.
    """
    errors = per_timestep(errors, aggregate)
    images, candidates, grid = errors.shape
    if not np.isfinite(errors).all():
        raise UserError("a first look is fitted on exhaustive errors: every candidate at every grid timestep (these "
                        "have unmeasured cells, as a pruned run's do)")
    if grid != len(timesteps):
        raise UserError(f"errors have {grid} timesteps but {len(timesteps)} are named")
    if not 1 <= n_timesteps <= grid:
        raise UserError(f"a first look takes 1 to {grid} timesteps")
    if not 0 < miss_rate < 1:
        raise UserError("the first look's miss rate must lie in (0, 1)")
    if winners is None:
        winners = errors.mean(axis=2).argmin(axis=1)
    winners = np.asarray(winners, dtype=int)
    if winners.shape != (images,) or not ((0 <= winners) & (winners < candidates)).all():
        raise UserError(f"a first look's winners must be one candidate index per image ({images})")
    choose, calibrate = errors[0::2], errors[1::2]
    if math.ceil((len(calibrate) + 1) * (1 - miss_rate)) > len(calibrate):
        need = 2 * (math.ceil(1 / miss_rate) - 1)
        raise UserError(f"{images} held-out images cannot bound a miss rate of {miss_rate}: it takes at least {need} "
                        "(half of them choose the timesteps, half set the threshold)")
    chosen = _choose_timesteps(choose, n_timesteps, miss_rate, winners[0::2])
    gaps = relative_gaps(calibrate, chosen)
    threshold = conformal_quantile(gaps[np.arange(len(calibrate)), winners[1::2]], miss_rate)
    size = float((gaps <= threshold).sum(axis=1).mean())
    return FirstLook(tuple(int(timesteps[c]) for c in sorted(chosen)), threshold, miss_rate, grid, images, size,
                     resolution)


def _choose_timesteps(errors: np.ndarray, n_timesteps: int, miss_rate: float,
                      winners: np.ndarray | None = None, already: Sequence[int] = ()) -> list[int]:
    """Grid columns added greedily to `already`, each the one that makes the mean conformal shortlist smallest on
    `errors` (the shortlist that keeps `winners`, by default each image's lowest mean error over the grid);
    returns `already` and the n_timesteps added."""
    images, _, grid = errors.shape
    winners = errors.mean(axis=2).argmin(axis=1) if winners is None else winners
    chosen: list[int] = list(already)
    for _ in range(n_timesteps):
        best = None
        for column in range(grid):
            if column in chosen:
                continue
            gaps = relative_gaps(errors, chosen + [column])
            threshold = conformal_quantile(gaps[np.arange(images), winners], miss_rate)
            size = float((gaps <= threshold).sum(axis=1).mean())
            if best is None or size < best[0]:
                best = (size, column)
        chosen.append(best[1])
    return chosen


def doubling_stages(grid: int, first: int = 3) -> list[int]:
    """A cascade's default stage sizes on a grid of `grid` points: first, 2 first, 4 first, ... below 3/4 of the
    grid (a stage nearly as large as the grid saves next to nothing and spends a share of the miss rate)."""
    sizes = []
    while 4 * first < 3 * grid:
        sizes.append(first)
        first *= 2
    return sizes


def fit_cascade(errors: np.ndarray, timesteps: Sequence[int], miss_rate: float = 0.05,
                first: int | Sequence[int] = 1, stages: Sequence[int] | None = None, aggregate: str = "min",
                labels: Sequence[str] | None = None,
                levels: Sequence[tuple[dict, np.ndarray, int | Sequence[int]]] = (), calibration: str = "joint"):
    """Fit a Cascade (strategies.py) on held-out images scored exhaustively at `timesteps` (an even grid).

    errors: [images, classes, grid] (or with a prompts axis before the grid). The stages: `first` timesteps
    chosen greedily where the class information is (as the first look's), then even subsets of the grid of
    `stages` sizes (default doubling_stages above `first`: 3, 6, 12, ... below 3/4 of the grid), each adding to
    the timesteps before it, then the rest of the grid. `levels` (optional, before them): coarse levels, each (a family
    {coarse label: [class labels]}, the coarse candidates' exhaustive errors [images, groups, (prompts,) grid] in
    the family's order, how many timesteps it gets), with `labels` the class labels. A family may come back: a
    later level of the same family adds timesteps for the groups still in and prunes on all of the family's
    timesteps so far (a few timesteps for every group, more for the few left, as the fine stages double).

    The images are split in two: every other one chooses the timesteps, the others set the gaps from the
    exhaustive winner's gap (its group's, at a coarse level) at each stage. `calibration`:

    * "joint" (default): one split-conformal quantile for all stages at once. Each stage's gap is a common
      factor times its scale (the winner's gap quantile on the choosing half, at the levels that prune most
      cheaply there: _cheapest_scales); the factor is the conformal quantile at miss_rate of each calibration
      image's largest gap-to-scale ratio over the stages, so the winner survives every stage with probability
      >= 1 - miss_rate without splitting the rate between them.
    * "union": each stage at the conformal quantile at miss_rate / stages (a union bound; looser, and it
      needs stages / miss_rate calibration images).

    `first` and each level's timesteps may be lists of options: every combination is fitted and the one whose
    NFE on the choosing half (held_out_nfe) is lowest is returned; the calibrating half plays no part in the
    choice, so the promise holds for it.

    How many held-out images: the gaps are a tail quantile, so their cost varies from one calibration set to the
    next (benchmarks/many_classes.py, 1,000 classes: 100-300 NFE between random halvings of 600 images).
    """
    from .strategies import Cascade

    firsts = [int(k) for k in (first if isinstance(first, Sequence) else [first])]
    options = [[int(k) for k in (ks if isinstance(ks, Sequence) else [ks])] for _, _, ks in levels]
    if not firsts or not all(options):
        raise UserError("a cascade's options for its first stage and levels cannot be empty")
    if len(firsts) > 1 or any(len(ks) > 1 for ks in options):
        fits = [fit_cascade(errors, timesteps, miss_rate, k, stages, aggregate, labels,
                            [(family, coarse, ks) for (family, coarse, _), ks in zip(levels, combination)], calibration)
                for k in firsts for combination in itertools.product(*options)]
        return min(fits, key=lambda cascade: cascade.held_out_nfe)
    first = firsts[0]
    levels = [(family, coarse, ks[0]) for (family, coarse, _), ks in zip(levels, options)]

    errors = per_timestep(errors, aggregate)
    images, classes, grid = errors.shape
    if not np.isfinite(errors).all():
        raise UserError("a cascade is fitted on exhaustive errors: every candidate at every grid timestep")
    if grid != len(timesteps):
        raise UserError(f"errors have {grid} timesteps but {len(timesteps)} are named")
    if not 1 <= first < grid:
        raise UserError(f"a cascade's first stage takes 1 to {grid - 1} timesteps")
    if not 0 < miss_rate < 1:
        raise UserError("the cascade's miss rate must lie in (0, 1)")
    if calibration not in ("joint", "union"):
        raise UserError(f"a cascade's calibration is 'joint' or 'union', not {calibration!r}")
    sizes = [k for k in doubling_stages(grid) if k > first] if stages is None else [int(k) for k in stages]
    if any(not first < k < grid for k in sizes) or sizes != sorted(set(sizes)):
        raise UserError(f"cascade stage sizes must rise between {first} (the first stage) and {grid} (the grid)")
    if levels and labels is None:
        raise UserError("coarse levels need the class labels")
    n_stages = len(levels) + 1 + len(sizes)
    level = miss_rate / n_stages if calibration == "union" else miss_rate
    choose, calibrate = np.arange(0, images, 2), np.arange(1, images, 2)
    if math.ceil((len(calibrate) + 1) * (1 - level)) > len(calibrate):
        need = 2 * (math.ceil(1 / level) - 1)
        over = f" over {n_stages} stages (a union bound)" if calibration == "union" else ""
        raise UserError(f"{images} held-out images cannot bound a miss rate of {miss_rate}{over}: it takes at least "
                        f"{need} (half of them choose timesteps, half set the gaps)")
    winners = errors.mean(axis=2).argmin(axis=1)
    fitted, families, gaps, shape = [], [], [], []  # gaps: the winner's per stage; shape: what _pruned_cost needs
    index = {label: i for i, label in enumerate(labels or ())}
    scored: dict[int, list[int]] = {}  # family -> its grid columns scored so far (a family may come back)
    for family, coarse_errors, k in levels:
        coarse_errors = per_timestep(coarse_errors, aggregate)
        if coarse_errors.shape != (images, len(family), grid):
            raise UserError(f"a coarse level's errors must be [images, {len(family)} groups, {grid} timesteps]")
        group_of = np.full(classes, -1)
        for g, members in enumerate(family.values()):
            group_of[[index[m] for m in members]] = g
        if (group_of < 0).any():
            raise UserError("each coarse level must cover every class")
        if family not in families:
            families.append(family)
        number = families.index(family)
        before = scored.get(number, [])
        if len(before) + k > grid:
            raise UserError(f"a coarse level asks for more timesteps than the {grid} of the grid")
        group_winners = group_of[winners]
        chosen = _choose_timesteps(coarse_errors[choose], k, level, group_winners[choose], before)
        scored[number] = chosen
        scores = coarse_errors[:, :, chosen].mean(axis=2)  # over every timestep of the family so far, as at run time
        gaps.append(gaps_to_best(scores)[np.arange(images), group_winners])
        shape.append((k, group_of, scores[choose]))
        fitted.append({"timesteps": [int(timesteps[c]) for c in sorted(chosen[len(before):])], "family": number})
    # each stage's gap is measured on every timestep scored so far, as it is at run time
    done = sorted(_choose_timesteps(errors[choose], first, level))
    new = done
    for k in [None, *sizes]:
        if k is not None:
            new = sorted(set(even_subset(range(grid), k)) - set(done))
            if not new:  # the first stage already holds these timesteps: nothing to add
                continue
            done = sorted(set(done) | set(new))
        scores = errors[:, :, done].mean(axis=2)
        gaps.append(gaps_to_best(scores)[np.arange(images), winners])
        shape.append((len(new), None, scores[choose]))
        fitted.append({"timesteps": [int(timesteps[c]) for c in new], "family": None})
    gaps = np.stack(gaps)
    rest = grid - len(done)
    if calibration == "union":
        max_gaps = [conformal_quantile(stage[calibrate], level) for stage in gaps]
        cost = _pruned_cost(shape, [conformal_quantile(stage[choose], level) for stage in gaps], rest)
    else:
        cost, scales = _cheapest_scales(gaps[:, choose], shape, rest, miss_rate)
        factor = conformal_quantile((gaps[:, calibrate] / scales[:, None]).max(axis=0), miss_rate)
        max_gaps = list(factor * scales)
    for stage, max_gap in zip(fitted, max_gaps):
        stage["max_gap"] = float(max_gap)
    return Cascade(fitted, grid, miss_rate, families, fitted_on=images, calibration=calibration,
                   held_out_nfe=round(cost, 1))


SCALE_LEVELS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


def _cheapest_scales(winner_gaps: np.ndarray, shape: list, rest: int, miss_rate: float,
                     sweeps: int = 2) -> tuple[float, np.ndarray]:
    """A joint cascade's per-stage gap scales, chosen on the choosing half only (so the calibration stays valid),
    and their NFE per image there.

    A stage's scale is the winner's gap quantile at one of SCALE_LEVELS; the scales are scaled together to keep
    the winner on 1 - miss_rate of these images, and the cheapest pruning here wins: first one level for every
    stage, then each stage's level alone, stage by stage, for up to `sweeps` passes. The relative sizes of the
    gaps decide where the miss rate is spent, and no one level suits every stage: a stage where the winner's
    gap has a long tail needs a wide gap or it spends the whole rate, a cheap coarse stage may spend more."""
    candidates = np.stack([np.quantile(winner_gaps, q, axis=1) for q in SCALE_LEVELS])  # [levels, stages]
    candidates = np.maximum(candidates, 1e-3 * candidates.max(initial=0.0) + 1e-12)  # a stage the winner always led

    # each option's cost is cross-fitted within these images (factor from one half, cost on the other): an
    # in-sample factor favours the options whose few large ratios happen to sit just past its quantile here
    halves = [np.arange(0, winner_gaps.shape[1], 2), np.arange(1, winner_gaps.shape[1], 2)]
    rate = max(miss_rate, 1 / len(halves[1]))  # the halves are small; a rate they cannot bound takes their largest

    shapes = [[(new, group_of, scores[use]) for new, group_of, scores in shape] for use in halves]

    def cost(scales):
        total = 0.0
        for fit, use, use_shape in ((halves[0], halves[1], shapes[1]), (halves[1], halves[0], shapes[0])):
            factor = conformal_quantile((winner_gaps[:, fit] / scales[:, None]).max(axis=0), rate)
            total += _pruned_cost(use_shape, factor * scales, rest) * len(use)
        return total / winner_gaps.shape[1]

    best = min(((cost(scales), scales) for scales in candidates), key=lambda pair: pair[0])
    for _ in range(sweeps):
        improved = False
        for stage in range(len(best[1])):
            for level in candidates[:, stage]:
                scales = best[1].copy()
                scales[stage] = level
                trial = cost(scales)
                if trial < best[0] - 1e-9:
                    best, improved = (trial, scales), True
        if not improved:
            break
    return best


def _pruned_cost(shape: list, max_gaps: Sequence[float], rest: int) -> float:
    """Mean NFE per image of a cascade with these gaps, run on the images whose mean errors per stage `shape`
    holds: (new timesteps, the class -> group map of a coarse level or None, scores [images, rows] over the
    timesteps so far). As at run time, gaps are to the best row still in."""
    alive = None
    cost = 0.0
    for (new, group_of, scores), max_gap in zip(shape, max_gaps):
        if alive is None:
            alive = np.ones((len(scores), len(group_of) if group_of is not None else scores.shape[1]), bool)
        busy = alive.sum(axis=1) > 1
        if group_of is not None:
            members = np.arange(scores.shape[1]) == group_of[:, None]  # [classes, groups]
            live = (alive.astype(np.float32) @ members) > 0
            cost += new * float((live.sum(axis=1) * busy).sum())
            with np.errstate(invalid="ignore"):  # an image down to one row: inf - inf, not pruned
                kept = (gaps_to_best(np.where(live, scores, np.inf)) <= max_gap)[:, group_of]
        else:
            cost += new * float((alive.sum(axis=1) * busy).sum())
            with np.errstate(invalid="ignore"):
                kept = gaps_to_best(np.where(alive, scores, np.inf)) <= max_gap
        alive &= kept | ~busy[:, None]
    count = alive.sum(axis=1)
    cost += rest * float((count * (count > 1)).sum())
    return cost / len(alive)
