"""Which (class, timestep) pairs to evaluate, and in what order.

A strategy is a generator over rounds. Each round names classes and timesteps; the
engine evaluates every (class, prompt, timestep) combination of the round for one
image, writes the errors into the image's `ScoreTable`, and asks for the next round.
Decisions between rounds read the table, so strategies never touch the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapters.schedules import NoiseSchedule, as_schedule, even_subset
from ..errors import UserError
from . import probabilities
from .shortlists import FirstLook, gaps_to_best


@dataclass(frozen=True)
class Round:
    classes: tuple[int, ...]
    timesteps: tuple[int, ...]


class ScoreTable:
    """Errors measured for one image: errors[candidate, prompt, column], and which of them were measured.

    `evaluated` (a boolean mask of the same shape) says which cells hold a measurement; unmeasured cells of
    `errors` read NaN, so means over a row skip them. A measured error is always finite: the engine stops
    with an error on NaN or inf (scoring.NonFiniteError) rather than storing one. Write cells with `record`.
    Columns are the distinct timesteps in the order they were first evaluated; the column index is
    also the noise index (the i-th distinct timestep evaluated for an image uses noise i, as in the
    original implementation's saved-noise layout). With a null condition (unconditional
    normalisation), `null_errors[column]` is its error at every column any candidate was evaluated at.
    """

    def __init__(self, n_classes: int, n_prompts: int, t_min: int = 0, with_null: bool = False):
        self.t_min = int(t_min)  # strategies lay their grids over [t_min, T) (noise-aware scoring)
        self._buffer = np.full((n_classes, n_prompts, 8), np.nan)  # grows by doubling
        self._done = np.zeros(self._buffer.shape, dtype=bool)
        self._null = np.full(8, np.nan) if with_null else None
        self._null_done = np.zeros(8, dtype=bool) if with_null else None
        self.timesteps: list[int] = []
        self._column_of: dict[int, int] = {}
        self.evidence: dict = {}  # strategies may record why they decided (e.g. elimination gaps)

    @property
    def errors(self) -> np.ndarray:
        """[candidates, prompts, columns] view of the errors measured so far (NaN where not measured)."""
        return self._buffer[:, :, : len(self.timesteps)]

    @property
    def evaluated(self) -> np.ndarray:
        """[candidates, prompts, columns] mask of the measured cells."""
        return self._done[:, :, : len(self.timesteps)]

    @property
    def null_errors(self) -> np.ndarray | None:
        """[columns] view of the null condition's errors, or None without one."""
        return None if self._null is None else self._null[: len(self.timesteps)]

    @property
    def null_evaluated(self) -> np.ndarray | None:
        return None if self._null_done is None else self._null_done[: len(self.timesteps)]

    def record(self, candidates, prompts, columns, values) -> None:
        """Store measured errors at errors[candidates, prompts, columns] (numpy indexing) and mark them."""
        self.errors[candidates, prompts, columns] = values
        self.evaluated[candidates, prompts, columns] = True

    def record_null(self, columns, values) -> None:
        self.null_errors[columns] = values
        self.null_evaluated[columns] = True

    def column(self, t: int) -> int:
        if t not in self._column_of:
            if len(self.timesteps) == self._buffer.shape[2]:
                size = 2 * self._buffer.shape[2]
                self._buffer = _grown(self._buffer, size, np.nan)
                self._done = _grown(self._done, size, False)
                if self._null is not None:
                    self._null, self._null_done = _grown(self._null, size, np.nan), _grown(self._null_done, size, False)
            self._column_of[t] = len(self.timesteps)
            self.timesteps.append(t)
        return self._column_of[t]

    @property
    def n_classes(self) -> int:
        return self.errors.shape[0]

    @property
    def nfe(self) -> int:
        null = 0 if self._null is None else int(self.null_evaluated.sum())
        return int(self.evaluated.sum()) + null

    def class_scores(self, aggregate: str = "min") -> np.ndarray:
        """Mean error over evaluated timesteps per (candidate, prompt), then min or mean over prompts."""
        return probabilities.class_scores(self.errors, aggregate)

    def ranking(self, aggregate: str = "min") -> np.ndarray:
        """Candidate indices best first: those that survived longer first, then by lower mean error."""
        return probabilities.ranking(self.errors, aggregate)


def _grown(array: np.ndarray, size: int, fill) -> np.ndarray:
    """`array` with its last axis grown to `size`, the new cells `fill`."""
    grown = np.full(array.shape[:-1] + (size,), fill, dtype=array.dtype)
    grown[..., : array.shape[-1]] = array
    return grown


class Strategy:
    def resolve(self, labels: Sequence[str]) -> Strategy:
        """The strategy bound to the candidates' names (for strategies configured by name)."""
        return self

    def rounds(self, table: ScoreTable, schedule: NoiseSchedule, aggregate: str,
               candidates: Sequence[int] | None = None) -> Iterator[Round]:
        """Rounds for one image over `candidates` (rows of the table; default all of them); grid positions
        come from `schedule.grid`."""
        raise NotImplementedError

    def extra_candidates(self) -> list[str]:
        """Conditions a strategy scores besides the classes (coarse candidates); none by default."""
        return []

    def low_resolution_look(self) -> FirstLook | None:
        """A first look the caller runs before the rounds at another resolution (low_resolution.py); its
        shortlist comes back as the rounds' candidates. None by default."""
        return None

    def describe(self) -> dict:
        raise NotImplementedError

    def timestep_budget(self) -> int:
        """The most timesteps any candidate is scored at (what a leader's mean error rests on)."""
        raise NotImplementedError


class Exhaustive(Strategy):
    """Every candidate at n evenly spaced timesteps."""

    def __init__(self, n_timesteps: int = 25):
        self.n_timesteps = int(n_timesteps)
        if self.n_timesteps < 1:
            raise UserError(f"--timesteps must be at least 1, got {self.n_timesteps}")

    def rounds(self, table, schedule, aggregate, candidates=None):
        grid = schedule.grid(self.n_timesteps, table.t_min)
        yield Round(tuple(_candidates(table, candidates)), tuple(grid))

    def describe(self):
        return {"name": "exhaustive", "n_timesteps": self.n_timesteps}

    def timestep_budget(self) -> int:
        return self.n_timesteps


class FixedTimesteps(Strategy):
    """Every candidate at the given timesteps (ablations, or a grid of your own)."""

    def __init__(self, timesteps: Sequence[int]):
        self.timesteps = [int(t) for t in timesteps]
        if not self.timesteps or len(set(self.timesteps)) != len(self.timesteps):
            raise UserError("timesteps must be a non-empty list without repeats")

    def rounds(self, table, schedule, aggregate, candidates=None):
        T = schedule.num_train_timesteps
        if not all(0 <= t < T for t in self.timesteps):
            raise UserError(f"timesteps must lie in [0, {T})")
        chosen = [t for t in self.timesteps if t >= table.t_min] or [max(self.timesteps)]
        yield Round(tuple(_candidates(table, candidates)), tuple(chosen))

    def describe(self):
        return {"name": "fixed", "timesteps": self.timesteps}

    def timestep_budget(self) -> int:
        return len(self.timesteps)


class Staged(Strategy):
    """The paper's adaptive schedule: stage i scores the remaining candidates at n_samples[i]
    timesteps, then keeps the to_keep[i] best.

    Stage grids follow the original code: the finest grid has max(n_samples) points,
    stage i takes every (len // n_i)-th point of it starting at (len // n_i // 2),
    and skips timesteps already evaluated, so NFE equals the original's.
    """

    def __init__(self, n_samples: Sequence[int], to_keep: Sequence[int]):
        n_samples, to_keep = [int(n) for n in n_samples], [int(k) for k in to_keep]
        if not n_samples or len(n_samples) != len(to_keep):
            raise UserError("--n-samples and --to-keep need the same (non-zero) number of stages")
        if to_keep[-1] != 1:
            raise UserError("the last --to-keep entry must be 1 (one prediction)")
        if any(a < b for a, b in zip(to_keep, to_keep[1:])) or min(n_samples) < 1:
            raise UserError("--to-keep must not increase between stages and --n-samples must be positive")
        self.n_samples, self.to_keep = n_samples, to_keep

    def stage_timesteps(self, schedule: NoiseSchedule | int, t_min: int = 0) -> list[list[int]]:
        """The new timesteps each stage evaluates (before any candidate is pruned)."""
        finest = as_schedule(schedule).grid(max(self.n_samples), t_min)
        seen: set[int] = set()
        stages = []
        for n in self.n_samples:
            grid = [t for t in even_subset(finest, n) if t not in seen]
            seen.update(grid)
            stages.append(grid)
        return stages

    def expected_nfe(self, n_classes: int, schedule: NoiseSchedule | int, n_prompts: int = 1) -> int:
        remaining, total = n_classes, 0
        for grid, keep in zip(self.stage_timesteps(schedule), self.to_keep):
            total += remaining * len(grid) * n_prompts
            remaining = min(remaining, keep)
        return total

    def rounds(self, table, schedule, aggregate, candidates=None):
        remaining = _candidates(table, candidates)
        for grid, keep in zip(self.stage_timesteps(schedule, table.t_min), self.to_keep):
            if grid:
                yield Round(tuple(remaining), tuple(grid))
            scores = table.class_scores(aggregate)[remaining]
            order = np.argsort(scores, kind="stable")[:keep]
            remaining = [remaining[i] for i in order]

    def describe(self):
        return {"name": "staged", "n_samples": self.n_samples, "to_keep": self.to_keep}

    def timestep_budget(self) -> int:
        return max(self.n_samples)


def low_discrepancy_order(n: int) -> list[int]:
    """Indices 0..n-1 in van der Corput (base 2) order: every prefix spreads evenly over the range."""
    order, seen, k = [], set(), 0
    while len(order) < n:
        k += 1
        u, denominator, i = 0.0, 1.0, k
        while i:
            denominator *= 2
            u += (i % 2) / denominator
            i //= 2
        index = int(u * n)
        if index not in seen:
            seen.add(index)
            order.append(index)
        if k > 64 * n:  # cannot happen for n >= 1; keeps the loop provably finite
            order += [i for i in range(n) if i not in seen]
    return order


def _candidates(table: ScoreTable, candidates: Sequence[int] | None) -> list[int]:
    return list(range(table.n_classes)) if candidates is None else [int(c) for c in candidates]


class Elimination(Strategy):
    """Anytime elimination with paired statistics (beyond the paper).

    Timesteps come in rounds from an even grid of `max_timesteps` points, in van der Corput order, so
    every prefix covers the schedule evenly. All surviving candidates are scored at the same (t, eps)
    pairs, so the per-timestep differences between a candidate and the current leader are paired
    samples. A candidate is dropped once the lower confidence bound of its mean gap to the leader is
    above zero. The promise: the candidate exhaustive scoring on the whole grid would pick is dropped with
    probability at most `error_rate` per image. The bound is Student's t with n - 1 degrees of freedom
    (n timesteps seen; a normal quantile is almost twice too narrow at n = 8 and the levels below), with
    the finite-population correction sqrt((N - n) / (N - 1)) for a grid of N points (the target is the mean
    over the grid, which is known exactly once all of it is seen), at level
    error_rate / ((n_candidates - 1) * r * (r + 1)) at look r: Bonferroni over the candidates the winner
    could be compared with, and a spending sequence over looks that sums to error_rate, so the promise holds
    at whatever look the search stops (anytime-valid). `bound="normal"` is the earlier normal-quantile bound,
    kept to replay stored configurations; it does not keep the promise with many candidates.
    Stops when one candidate is left, the grid is exhausted, or the next round would pass `max_nfe`.

    `first_look` (optional, for many candidates): a fitted FirstLook (shortlists.py) or its dict: the
    first round scores every candidate at its timesteps (chosen on held-out images as where the class
    information is), then keeps the candidates whose relative gap to the leader is at most its `max_gap`
    (a threshold that kept the exhaustive winner on 1 - miss_rate of the held-out images: a conformal
    shortlist, sized per image by the statistics). Statistical elimination then goes on among them from
    `min_timesteps`. Its miss rate adds to error_rate in the promise. The first look is always spent in
    full; `max_nfe` bounds what follows it. A first look with a `resolution` (latent models) is run by the
    caller at that resolution before the rounds (low_resolution.py), which then start from its shortlist.

    `shortlist` (optional): after the first round keep only this many best candidates (a plain top-k,
    not a statistical test).

    `class_tree` (optional, for many classes): groups of classes, nested, as class names or indices
    (e.g. {"footwear": ["Sandal", "Sneaker"], "tops": [...]}; classes left out are groups of their
    own). After look r, only the `keep_groups` best groups at depth r survive (a group scores as its
    best member), so the search descends one level of the tree per round and confusable siblings stay
    together until the statistics separate them. Like the shortlist this is a top-k, not a test.
    """

    def __init__(self, error_rate: float = 0.05, max_nfe: int | None = None, max_timesteps: int = 100,
                 round_size: int = 4, min_timesteps: int = 8, shortlist: int | None = None,
                 class_tree: list | dict | None = None, keep_groups: int = 2, first_look=None,
                 bound: str = "t"):
        if not 0 < error_rate < 1:
            raise UserError("--error-rate must lie in (0, 1)")
        if max_nfe is not None and max_nfe < 1:
            raise UserError("--max-nfe must be positive")
        if round_size < 1 or min_timesteps < 2 or max_timesteps < 1:
            raise UserError("round size >= 1, minimum timesteps >= 2 and max timesteps >= 1 are required")
        if shortlist is not None and shortlist < 1:
            raise UserError("--shortlist must be at least 1")
        if class_tree is not None and shortlist is not None:
            raise UserError("give a shortlist or a class tree, not both")
        if keep_groups < 1:
            raise UserError("--keep-groups must be at least 1")
        if bound not in BOUNDS:
            raise UserError(f"unknown elimination bound {bound!r}; choose one of {', '.join(BOUNDS)}")
        if first_look is not None:
            first_look = first_look if isinstance(first_look, FirstLook) else FirstLook.from_dict(first_look)
            if shortlist is not None or class_tree is not None:
                raise UserError("a first look makes its own shortlist: give it without --shortlist or --class-tree")
            if first_look.grid != max_timesteps:
                raise UserError(f"the first look was fitted on a grid of {first_look.grid} timesteps, and its promise "
                                f"is about that grid: use --max-timesteps {first_look.grid}, not {max_timesteps}")
        self.first_look, self.bound = first_look, bound
        self.error_rate, self.max_nfe, self.max_timesteps = error_rate, max_nfe, max_timesteps
        self.round_size, self.min_timesteps, self.shortlist = round_size, min_timesteps, shortlist
        self.class_tree, self.keep_groups = class_tree, keep_groups

    def resolve(self, labels):
        if self.class_tree is None:
            return self
        resolved = copy.copy(self)
        resolved.class_tree = class_tree_indices(self.class_tree, labels)
        return resolved

    def rounds(self, table, schedule, aggregate, candidates=None):
        grid = schedule.grid(min(self.max_timesteps, schedule.num_train_timesteps), table.t_min)
        order = [grid[i] for i in low_discrepancy_order(len(grid))]
        alive = _candidates(table, candidates)
        n_prompts = table.errors.shape[1]
        comparisons = max(1, len(alive) - 1)
        position, look = 0, 0
        groups = class_tree_indices(self.class_tree, range(table.n_classes)) if self.class_tree else None
        if groups is not None and candidates is not None:
            raise UserError("a class tree works on all candidates; it cannot follow a coarse-to-fine search")
        if self.low_resolution_look() is not None:
            if candidates is None:
                raise UserError(f"this first look scores at {self.first_look.resolution} px: image classification "
                                "runs it before the rounds; image-text matching and a replay of stored errors cannot")
            if len(alive) == 1:  # the look left one class: score it once so that it ranks first
                yield Round(tuple(alive), (grid[len(grid) // 2],))
                return
        if self.first_look is not None and self.first_look.resolution is None and len(alive) > 1:
            first = self.first_look.timesteps_on(grid)
            yield Round(tuple(alive), tuple(first))
            alive = self.first_look.shortlist(table, alive, aggregate)
            order = first + [t for t in order if t not in first]
            position = len(first)
        while len(alive) > 1 and position < len(order):
            size = max(self.round_size, self.min_timesteps - position)
            if self.max_nfe is not None:
                per_timestep = len(alive) * n_prompts + (table.null_errors is not None)
                size = min(size, (self.max_nfe - table.nfe) // per_timestep)
                if size < 1:
                    break
            batch = order[position:position + size]
            position += len(batch)
            yield Round(tuple(alive), tuple(batch))
            look += 1
            if look == 1 and self.shortlist is not None and self.shortlist < len(alive):
                scores = table.class_scores(aggregate)[alive]
                alive = [alive[i] for i in np.argsort(scores, kind="stable")[: self.shortlist]]
            if groups is not None and any(isinstance(g, list) for g in groups):
                scores = np.full(table.n_classes, np.inf)
                scores[alive] = table.class_scores(aggregate)[alive]  # equal footing: same timesteps
                groups = _best_groups(groups, scores, self.keep_groups)
                kept = set(_leaves(groups))
                for c in alive:
                    if c not in kept:
                        table.evidence[int(c)] = {"eliminated": True, "by": "class tree", "timesteps": position}
                alive = [c for c in alive if c in kept]
                groups = [child for g in groups for child in (g if isinstance(g, list) else [g])]
            columns = [table.column(t) for t in order[:position]]
            per_t = probabilities.per_timestep_errors(table.errors[np.ix_(alive, range(n_prompts), columns)],
                                                      aggregate)  # [alive, timesteps]
            leader = int(np.argmin(per_t.mean(axis=1)))
            gaps = per_t - per_t[leader]
            n = gaps.shape[1]
            mean = gaps.mean(axis=1)
            stderr = gaps.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else np.full(len(alive), np.inf)
            level = self.error_rate / (comparisons * look * (look + 1))
            if self.bound == "t":
                stderr = stderr * np.sqrt(max(len(order) - n, 0) / max(len(order) - 1, 1))
            z = _quantile(1 - level, n - 1 if self.bound == "t" else None)
            keep = [i for i in range(len(alive)) if i == leader or n < self.min_timesteps
                    or mean[i] - z * stderr[i] <= 0]
            for i in range(len(alive)):
                table.evidence[int(alive[i])] = {"gap": float(mean[i]), "stderr": float(stderr[i]),
                                                        "timesteps": n, "eliminated": i not in keep}
            alive = [alive[i] for i in keep]

    def low_resolution_look(self) -> FirstLook | None:
        return self.first_look if self.first_look is not None and self.first_look.resolution is not None else None

    def timestep_budget(self) -> int:
        return self.max_timesteps

    def describe(self):
        return {"name": "elimination", "error_rate": self.error_rate, "max_nfe": self.max_nfe,
                "max_timesteps": self.max_timesteps, "round_size": self.round_size,
                "min_timesteps": self.min_timesteps, "shortlist": self.shortlist,
                "class_tree": self.class_tree, "keep_groups": self.keep_groups,
                "first_look": None if self.first_look is None else self.first_look.to_dict(), "bound": self.bound}


BOUNDS = ("t", "normal")


class CoarseToFine(Strategy):
    """Hierarchical pruning with coarse candidates (beyond the paper), for many classes.

    `families`: one or more partitions of the classes into groups, each group named by a coarse
    candidate: a condition the model can score although it is not a class (a partial caption such as
    "a bag on the left" for the 90 "{a} to the left of {b}" captions; a parent class such as "a bag
    first, then anything"). As {coarse label: [class labels]} dicts. Families are levels, taken in
    order: each scores, at `timesteps` (grid timesteps, or a count spread evenly over an even grid of
    `grid` points), the coarse candidates of its groups that still hold a class, and only the classes of
    its `keep` best groups go on (a family that does not cover a class leaves it alone). Nested families
    (first item, then first two items) descend a class tree; independent ones (left item, right item)
    intersect. `then` (default Elimination()) finishes among the classes left. Coarse candidates are
    scored as classes are (the same templates and noise) and count in the NFE; they never appear in a
    ranking. Like a class tree this is a top-k, not a test: `keep` trades cost for the chance of losing
    the winner.
    """

    def __init__(self, families: dict | list, keep: int = 3, timesteps: int | Sequence[int] = 2, grid: int = 50,
                 then: Strategy | None = None):
        families = [families] if isinstance(families, dict) else list(families)
        if not families or not all(isinstance(f, dict) and f for f in families):
            raise UserError("coarse-to-fine needs one or more families: {coarse label: [class labels]}")
        if keep < 1:
            raise UserError("coarse-to-fine: keep must be at least 1")
        if isinstance(timesteps, int) and timesteps < 1 or not isinstance(timesteps, int) and not timesteps:
            raise UserError("coarse-to-fine: at least one first-round timestep")
        self.families, self.keep, self.grid = families, int(keep), int(grid)
        self.timesteps = timesteps if isinstance(timesteps, int) else [int(t) for t in timesteps]
        self.then = then if then is not None else Elimination()
        self._groups: list[list[tuple[int, list[int]]]] | None = None  # bound by resolve: (coarse row, class rows)

    def extra_candidates(self) -> list[str]:
        return list(dict.fromkeys(label for family in self.families for label in family))

    def resolve(self, labels):
        """`labels`: the classes followed by the extra candidates, as the classifier lays them out."""
        index = {label: i for i, label in enumerate(labels)}
        bound = copy.copy(self)
        bound._groups = []
        for family in self.families:
            groups = []
            for coarse, members in family.items():
                missing = [m for m in members if m not in index]
                if missing:
                    raise UserError(f"coarse-to-fine: {missing[0]!r} (under {coarse!r}) is not a candidate label")
                groups.append((index[coarse], [index[m] for m in members]))
            bound._groups.append(groups)
        bound.then = self.then.resolve(labels)
        return bound

    def rounds(self, table, schedule, aggregate, candidates=None):
        if self._groups is None:
            raise UserError("coarse-to-fine must be resolved against the candidate labels first")
        first = (even_subset(schedule.grid(self.grid, table.t_min), self.timesteps)
                 if isinstance(self.timesteps, int) else self.timesteps)
        coarse = {row for family in self._groups for row, _ in family}
        alive = [c for c in _candidates(table, candidates) if c not in coarse]
        for level, family in enumerate(self._groups):
            live = [(row, members) for row, members in family if set(members) & set(alive)]
            if len(live) <= self.keep:
                continue  # nothing to choose at this level
            yield Round(tuple(row for row, _ in live), tuple(first))
            scores = table.class_scores(aggregate)
            allowed = {c for _, members in sorted(live, key=lambda group: scores[group[0]])[: self.keep]
                       for c in members}
            covered = {c for _, members in family for c in members}
            for c in alive:
                if c in covered and c not in allowed:
                    table.evidence[int(c)] = {"eliminated": True, "by": "coarse-to-fine", "level": level}
            alive = [c for c in alive if c not in covered or c in allowed]
        if len(alive) > 1:
            yield from self.then.rounds(table, schedule, aggregate, candidates=alive)
        elif alive:  # one class left: score it once so it ranks first
            yield Round(tuple(alive), (first[0],))

    def timestep_budget(self) -> int:
        return self.then.timestep_budget()

    def describe(self):
        return {"name": "coarse-to-fine", "families": self.families, "keep": self.keep, "timesteps": self.timesteps,
                "grid": self.grid, "then": self.then.describe()}


class Cascade(Strategy):
    """A conformal cascade (beyond the paper), for many candidates: shortlists sized by statistics, in stages.

    Each stage scores the candidates still in at its timesteps, then keeps those whose mean error over every
    timestep of the stages so far is within a relative gap `max_gap` of the best one still in; the last step
    scores the survivors on the rest of the even grid of `grid` points, so the prediction is exhaustive
    scoring's among them. Optional coarse levels come first (stages with a `family`: an index into
    `families`, CoarseToFine's {coarse label: [class labels]} dicts): a level scores the coarse candidates
    of the groups still holding a class at its own timesteps and keeps the classes of the groups within its
    gap; a later level of the same family scores the groups still in at more timesteps and prunes on all of
    them. A stage is a dict {"timesteps": [...], "max_gap": g, "family": None or an index}.

    Fitted, not tuned: `fit_cascade` (shortlists.py) learns the timesteps and gaps from held-out images
    scored exhaustively on the grid. The promise: on images exchangeable with those, the exhaustive winner
    is dropped with probability at most `miss_rate`. The gaps are calibrated on the winner's gap to the best
    of all candidates, which is never smaller than its gap to the best of those still in; `calibration` says
    how the stages share the rate ("joint": one conformal quantile of the largest scaled gap over the stages;
    "union": miss_rate / stages each; None: set by hand).
    """

    def __init__(self, stages: Sequence[dict], grid: int, miss_rate: float, families: Sequence[dict] = (),
                 fitted_on: int = 0, calibration: str | None = None, held_out_nfe: float | None = None):
        stages = [dict(stage) for stage in stages]
        if not stages or not all({"timesteps", "max_gap"} <= set(stage) and stage["timesteps"] for stage in stages):
            raise UserError("a cascade needs stages, each with timesteps and a max_gap")
        if any(stage.get("family") is not None and not 0 <= stage["family"] < len(families) for stage in stages):
            raise UserError("a cascade stage names a family it does not hold")
        if not 0 < miss_rate < 1 or grid < 1:
            raise UserError("a cascade needs a miss rate in (0, 1) and a grid of at least one timestep")
        self.stages = [{"timesteps": [int(t) for t in stage["timesteps"]], "max_gap": float(stage["max_gap"]),
                        "family": stage.get("family")} for stage in stages]
        self.grid, self.miss_rate, self.families = int(grid), float(miss_rate), [dict(f) for f in families]
        self.fitted_on = int(fitted_on)  # held-out images it was fitted on (0: set by hand)
        self.calibration = calibration
        # its mean NFE per image on the held-out images that chose its timesteps: for comparing fits, and
        # optimistic for new images (they cost 10-90% more in benchmarks/many_classes.py)
        self.held_out_nfe = held_out_nfe
        self._groups: list[list[tuple[int, list[int]]]] | None = None if self.families else []

    def extra_candidates(self) -> list[str]:
        return list(dict.fromkeys(label for family in self.families for label in family))

    def resolve(self, labels):
        if not self.families:
            return self
        index = {label: i for i, label in enumerate(labels)}
        bound = copy.copy(self)
        bound._groups = []
        for family in self.families:
            missing = [m for coarse, members in family.items() for m in [coarse, *members] if m not in index]
            if missing:
                raise UserError(f"cascade: {missing[0]!r} is not a candidate label")
            bound._groups.append([(index[coarse], [index[m] for m in members]) for coarse, members in family.items()])
        return bound

    def rounds(self, table, schedule, aggregate, candidates=None):
        if self._groups is None:
            raise UserError("a cascade with coarse levels must be resolved against the candidate labels first")
        grid = schedule.grid(self.grid, table.t_min)
        points = np.asarray(grid)
        coarse = {row for family in self._groups for row, _ in family}
        alive = [c for c in _candidates(table, candidates) if c not in coarse]
        done: list[int] = []
        family_done: dict[int, set[int]] = {}  # a family's timesteps scored so far (a later stage may add more)
        for number, stage in enumerate(self.stages):
            if len(alive) <= 1:
                break
            timesteps = list(dict.fromkeys(int(points[np.abs(points - t).argmin()]) for t in stage["timesteps"]))
            if stage["family"] is not None:
                still_in = set(alive)
                live = [(row, members) for row, members in self._groups[stage["family"]]
                        if not still_in.isdisjoint(members)]
                seen = family_done.setdefault(stage["family"], set())
                new = [t for t in timesteps if t not in seen]
                seen.update(new)
                if new:  # the groups still live were live at the family's earlier stages: they hold those timesteps
                    yield Round(tuple(row for row, _ in live), tuple(new))
                scores = table.class_scores(aggregate)[[row for row, _ in live]]
                kept = {c for (_, members), gap in zip(live, gaps_to_best(scores)) if gap <= stage["max_gap"]
                        for c in members}
                covered = {c for _, members in self._groups[stage["family"]] for c in members}
                dropped = [c for c in alive if c in covered and c not in kept]
            else:
                new = [t for t in timesteps if t not in done]
                done += new
                if new:
                    yield Round(tuple(alive), tuple(new))
                gaps = gaps_to_best(table.class_scores(aggregate)[alive])
                dropped = [c for c, gap in zip(alive, gaps) if gap > stage["max_gap"]]
            for c in dropped:
                table.evidence[int(c)] = {"eliminated": True, "by": "cascade", "stage": number}
            out = set(dropped)
            alive = [c for c in alive if c not in out]
        rest = [t for t in grid if t not in done]
        if len(alive) > 1 and rest:
            yield Round(tuple(alive), tuple(rest))
        elif len(alive) == 1 and not done:  # a coarse level left one class: score it once so it ranks first
            yield Round(tuple(alive), (grid[len(grid) // 2],))

    def timestep_budget(self) -> int:
        return self.grid

    def describe(self):
        return {"name": "cascade", "stages": self.stages, "grid": self.grid, "miss_rate": self.miss_rate,
                "families": self.families, "fitted_on": self.fitted_on, "calibration": self.calibration,
                "held_out_nfe": self.held_out_nfe}

    def save(self, path: str | Path) -> None:
        from ..runtime import atomic_write_text

        atomic_write_text(json.dumps(self.describe(), indent=2) + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> Cascade:
        try:
            description = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the cascade {path}: {exc}") from None
        if not isinstance(description, dict) or description.pop("name", None) != "cascade":
            raise UserError(f"{path} does not describe a cascade (calibrate --cascade writes one)")
        try:
            return cls(**description)
        except TypeError as exc:
            raise UserError(f"{path}: not a cascade: {exc}") from None


def _quantile(p: float, degrees_of_freedom: int | None) -> float:
    """The p-quantile of Student's t (a normal one for None)."""
    if degrees_of_freedom is None:
        from statistics import NormalDist

        return NormalDist().inv_cdf(p)
    from scipy.stats import t

    return float(t.ppf(p, degrees_of_freedom))


def class_tree_indices(tree: list | dict, labels: Sequence) -> list:
    """A class tree of names (or indices) -> nested lists of class indices; unlisted classes are appended.

    A group is a list of members or an object whose values are its members (keys name the groups).
    """
    index = {label: i for i, label in enumerate(labels)}
    index.update({i: i for i in range(len(index))})
    seen: set[int] = set()

    def build(node):
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            if not node:
                raise UserError("class tree: a group has no members")
            return [build(child) for child in node]
        if isinstance(node, bool) or node not in index:
            raise UserError(f"class tree names {node!r}, which is not one of the candidate labels")
        if index[node] in seen:
            raise UserError(f"class tree names {node!r} twice")
        seen.add(index[node])
        return index[node]

    if not isinstance(tree, (dict, list)):
        raise UserError("a class tree is a JSON object or list of groups")
    top = build(tree)
    return top + [i for i in range(len(labels)) if i not in seen]


def _leaves(node) -> list[int]:
    return [leaf for child in node for leaf in _leaves(child)] if isinstance(node, list) else [node]


def _best_groups(groups: list, class_scores: np.ndarray, keep: int) -> list:
    """The `keep` groups whose best member has the lowest score (a lone class is a group of one)."""
    best = [class_scores[_leaves(g)].min() for g in groups]
    return [groups[i] for i in np.argsort(best, kind="stable")[:keep]]


def strategy_from_description(description: dict) -> Strategy:
    """The strategy a run or a stored calibration recorded (its describe()), rebuilt."""
    settings = dict(description)
    name = settings.pop("name", None)
    kinds = {"exhaustive": Exhaustive, "fixed": FixedTimesteps, "staged": Staged, "elimination": Elimination,
             "coarse-to-fine": CoarseToFine, "cascade": Cascade}
    if name == "coarse-to-fine" and isinstance(settings.get("then"), dict):
        settings["then"] = strategy_from_description(settings["then"])
    if name == "elimination":
        settings.setdefault("bound", "normal")  # recorded before the t bound: the only rule there was
    if name not in kinds:
        raise UserError(f"unknown strategy {name!r} in a stored configuration")
    try:
        return kinds[name](**settings)
    except TypeError as exc:
        raise UserError(f"stored {name} strategy has settings this version does not take: {exc}") from None
