"""What the image-text tasks (Winoground, caption pairs) share: examples of images and captions, scored by an
ImageTextMatcher, one stored row per example.

A row's `nfe` and `seconds` are summed over the example's images, `correct` is the example's headline outcome,
`ranking` a JSON object with its score matrices (`raw`, and `normalized` when the empty prompt was scored) and
its tag, `mean_errors` the raw mean errors [images, captions] and `errors` the per-timestep errors
[images, captions + 1, columns] whose last caption row is the empty prompt's (NaN where not measured), with the
timesteps of each image's columns. Metrics are recomputed from the stored rows, so a resumed run reports
exactly what an uninterrupted one would, and a report can re-score them over a range of timesteps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...engine.probabilities import mean_over_timesteps
from ...store import Row, array_bytes, errors_bytes
from ..base import Task, digest, within
from .matcher import ImageScores, ImageTextMatcher

HARDEST = 10  # examples a report lists


class MatchingTask(Task):
    unit = "example"
    images_per_example = 1

    def item_ids(self, items: Sequence) -> list[str]:
        return [ex.id for ex in items]

    def identity(self, run, items: Sequence) -> dict:
        return {"task": self.name, "examples": len(items), "example_ids_sha256": digest(self.item_ids(items))}

    def with_null(self, run) -> bool:
        return False

    def scorer(self, run, items: Sequence, denoiser, scoring) -> ImageTextMatcher:
        matcher = ImageTextMatcher(denoiser, config=scoring, with_null=self.with_null(run))
        for example in items:  # every example's captions, before anything is scored or stored
            matcher.check_texts(example.captions)
        return matcher

    def batch_size(self, scoring) -> int:
        return max(1, scoring.images_per_batch // self.images_per_example)

    def images(self, example) -> list:
        raise NotImplementedError

    def outcome(self, raw: np.ndarray, normalized: np.ndarray | None) -> tuple[int | None, bool]:
        """(prediction, correct) of one example from its [images, captions] scores."""
        raise NotImplementedError

    def score(self, matcher: ImageTextMatcher, items: Sequence, batch: list[int], prepared) -> list[Row]:
        chosen = [items[i] for i in batch]
        groups = [(self.images(ex), list(ex.captions)) for ex in chosen]
        scored = matcher.score_groups(groups, [[f"{ex.id}/{j}" for j in range(len(images))]
                                               for ex, (images, _) in zip(chosen, groups)])
        return [self._row(i, ex, s) for i, ex, s in zip(batch, chosen, scored)]

    def _row(self, idx: int, example, scored: list[ImageScores]) -> Row:
        raw = np.stack([s.scores("none") for s in scored])  # [images, captions]
        normalized = (np.stack([s.scores("unconditional") for s in scored]) if scored[0].null_errors is not None
                      else None)
        width = max(len(s.timesteps) for s in scored)
        errors = np.full((len(scored), raw.shape[1] + 1, width), np.nan)
        for i, s in enumerate(scored):
            errors[i, :-1, : len(s.timesteps)] = s.errors
            if s.null_errors is not None:
                errors[i, -1, : len(s.timesteps)] = s.null_errors
        prediction, correct = self.outcome(raw, normalized)
        outcome = {"raw": raw.tolist(), "normalized": None if normalized is None else normalized.tolist(),
                   "tag": getattr(example, "tag", None)}
        return Row(idx, example.id, None, prediction, int(correct), int(sum(s.nfe for s in scored)),
                   float(sum(s.seconds for s in scored)), json.dumps(outcome), array_bytes(-raw),
                   errors_bytes(errors), json.dumps([s.timesteps for s in scored]), "ok", None)

    # --- reading stored rows --------------------------------------------------------------------------------
    def scores(self, rows: list[Row], t_min: int = 0, t_max: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """([examples, images, captions] raw scores, the normalised ones or None) of the stored rows: as stored,
        or re-scored from the per-timestep errors over the timesteps in [t_min, t_max]."""
        if t_min == 0 and t_max is None:
            outcomes = [json.loads(r.ranking) for r in rows]
            raw = np.array([o["raw"] for o in outcomes], dtype=float)
            have = all(o["normalized"] is not None for o in outcomes)
            return raw, np.array([o["normalized"] for o in outcomes], dtype=float) if have and outcomes else None
        raw, normalized = [], []
        for r in rows:
            errors = r.error_matrix()  # [images, captions + 1, columns]
            keep = [within(ts, t_min, t_max) for ts in r.timestep_list()]
            if not all(k.any() for k in keep):  # an image without one would score NaN, silently a failure
                from ...errors import UserError

                raise UserError(f"no stored timestep of example {r.id} lies in [{t_min}, {t_max}]")
            picked = np.stack([np.where(np.pad(k, (0, errors.shape[2] - len(k)))[None], e, np.nan)
                               for k, e in zip(keep, errors)])
            raw.append(-mean_over_timesteps(picked[:, :-1]))
            normalized.append(-mean_over_timesteps(picked[:, :-1] - picked[:, -1:]))
        normalized_ok = all(np.isfinite(n).any() for n in normalized)
        return np.array(raw), np.array(normalized) if normalized_ok else None

    def metrics(self, rows: list[Row]) -> dict:
        ok = [r for r in rows if r.ok]
        if not ok:
            return {"examples": 0}
        raw, normalized = self.scores(ok)
        metrics = self.score_metrics(raw, normalized, [json.loads(r.ranking).get("tag") for r in ok])
        metrics["nfe_per_example"] = float(np.mean([r.nfe for r in ok]))
        return metrics

    def score_metrics(self, raw: np.ndarray, normalized: np.ndarray | None, tags: list) -> dict:
        raise NotImplementedError

    def margins(self, raw: np.ndarray, normalized: np.ndarray | None) -> np.ndarray:
        """Per example, how far it is from flipping its headline outcome (negative: it fails)."""
        raise NotImplementedError

    def report(self, run_dir: Path, config: dict, rows: list[Row], aggregate: str | None = None, t_min: int = 0,
               t_max: int | None = None, plots: bool = True) -> dict:
        from ...errors import UserError

        if aggregate is not None:
            raise UserError("--aggregate re-scores classification runs' prompt sets; an image-text run has one "
                            "prompt per caption")
        ok = [r for r in rows if r.ok]
        if not ok:
            raise UserError(f"{run_dir} has no scored examples yet")
        raw, normalized = self.scores(ok, t_min, t_max)
        tags = [json.loads(r.ranking).get("tag") for r in ok]
        metrics = self.score_metrics(raw, normalized, tags)
        margins = self.margins(raw, normalized)
        hardest = np.argsort(margins, kind="stable")[:HARDEST]
        nfe = np.array([r.nfe for r in ok])
        return {"run": str(run_dir), "task": self.name, "model": config.get("model"),
                "strategy": config.get("strategy"), "rescoring": {"t_min": t_min, "t_max": t_max},
                **metrics, "failed": len(rows) - len(ok),
                "nfe": {"mean": float(nfe.mean()), "p50": float(np.percentile(nfe, 50)),
                        "p95": float(np.percentile(nfe, 95))},
                "hardest": [{"id": ok[i].id, "tag": tags[i], "margin": float(margins[i]),
                             "scores": raw[i].tolist()} for i in hardest]}

    def report_lines(self, report: dict) -> list[str]:
        lines = [f"{report['run']}: {report['examples']} {self.name} examples ({report['failed']} failed)",
                 *["  " + line for line in self.headline(report)]]
        for tag, row in report.get("by_tag", {}).items():
            lines.append(f"    {tag or '(no tag)'}: {self.headline(row)[0]}")
        lines.append(f"  NFE per example mean {report['nfe']['mean']:.0f}, p95 {report['nfe']['p95']:.0f}")
        if report["rescoring"]["t_min"] or report["rescoring"]["t_max"] is not None:
            lines.append(f"  re-scored over stored timesteps in [{report['rescoring']['t_min']}, "
                         f"{report['rescoring']['t_max'] if report['rescoring']['t_max'] is not None else 'max'}]")
        lines.append("  hardest examples (margin < 0: the outcome fails):")
        lines += [f"    {h['id']}  margin {h['margin']:+.5f}" + (f"  ({h['tag']})" if h["tag"] else "")
                  for h in report["hardest"]]
        return lines

    def headline(self, metrics: dict) -> list[str]:
        raise NotImplementedError

    def choices(self, config: dict, rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
        """Every image's choice among its example's captions (raw scores), the right one being its own."""
        ok = [r for r in rows if r.ok]
        raw, _ = self.scores(ok)
        decisions = raw.reshape(-1, raw.shape[-1])
        right = np.tile(self.right_captions(raw.shape[1]), len(ok))
        relative = np.nanmax(decisions, axis=1, keepdims=True) - decisions
        # a caption a strategy dropped has no score: probability 0, as an unshared class's in classification
        return np.where(np.isnan(relative), np.inf, relative), right

    def right_captions(self, n_images: int) -> np.ndarray:
        raise NotImplementedError
