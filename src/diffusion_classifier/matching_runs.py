"""Image-text benchmark runs (Winoground, true/false-caption pairs): resumable, torchrun-able, stored.

One row per example in the run's results store (store.py): `nfe` and `seconds` summed over the
example's images, `correct` the example's headline outcome (Winoground: group; pairs: the true caption
wins), `ranking` a JSON object with the example's score matrices (`raw`, and `normalized` when the
empty prompt was scored) and its tag, `mean_errors` the raw mean errors [images, captions] and `errors`
the per-timestep errors [images, captions + 1, columns] whose last caption row is the empty prompt's
(NaN where not measured), with the timesteps of each image's columns. Metrics are recomputed from the
stored rows, so a resumed run reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .distributed import ProcessGroup
from .errors import UserError
from .matching import ImageScores, ImageTextMatcher
from .matching_data import CaptionPair, WinogroundExample
from .matching_metrics import pairs_accuracy, winoground_outcomes, winoground_scores
from .probabilities import same_score
from .runtime import atomic_write_text
from .store import ResultsStore, array_bytes, errors_bytes

TASKS = ("winoground", "pairs")


def _example_groups(task: str, examples: Sequence) -> list[tuple[list, list[str]]]:
    if task == "winoground":
        return [(list(ex.images), list(ex.captions)) for ex in examples]
    return [([ex.image], list(ex.captions)) for ex in examples]


def _row(idx: int, example, task: str, scored: list[ImageScores]) -> tuple:
    raw = np.stack([s.scores("none") for s in scored])  # [images, captions]
    normalized = np.stack([s.scores("unconditional") for s in scored]) if scored[0].null_errors is not None else None
    width = max(len(s.timesteps) for s in scored)
    errors = np.full((len(scored), raw.shape[1] + 1, width), np.nan)
    for i, s in enumerate(scored):
        errors[i, :-1, : len(s.timesteps)] = s.errors
        if s.null_errors is not None:
            errors[i, -1, : len(s.timesteps)] = s.null_errors
    if task == "winoground":
        image_scores = normalized if normalized is not None else raw
        correct = bool(winoground_outcomes(raw[None], image_scores[None])["group"][0])
        prediction = None
    else:
        # 0: the true caption wins; a tie (equal to TIE_RTOL) counts as a miss, as in pairs_accuracy
        prediction = int(raw[0, 1] >= raw[0, 0] or same_score(float(raw[0, 0]), float(raw[0, 1])))
        correct = prediction == 0
    outcome = {"raw": raw.tolist(), "normalized": None if normalized is None else normalized.tolist(),
               "tag": getattr(example, "tag", None)}
    return (idx, example.id, None, prediction, int(correct), int(sum(s.nfe for s in scored)),
            float(sum(s.seconds for s in scored)), json.dumps(outcome), array_bytes(-raw), errors_bytes(errors),
            json.dumps([s.timesteps for s in scored]), "ok", None)


def metrics_from_rows(task: str, outcomes: list[dict], nfe: list[int], normalize: str | None = None) -> dict:
    """The task's metrics from stored outcomes. Winoground's image score uses the normalised scores unless
    `normalize` is 'none' (or the empty prompt was not scored); the text score uses the raw ones."""
    if not outcomes:
        return {"examples": 0}
    raw = np.array([o["raw"] for o in outcomes])
    if task == "pairs":
        metrics = pairs_accuracy(raw[:, 0, 0], raw[:, 0, 1])
    else:
        have_normalized = all(o["normalized"] is not None for o in outcomes)
        use = "none" if normalize == "none" or not have_normalized else "unconditional"
        image = np.array([o["normalized"] for o in outcomes]) if use == "unconditional" else raw
        tags = [o.get("tag") for o in outcomes]
        metrics = {**winoground_scores(raw, image, tags), "image_normalize": use}
        if have_normalized:  # both image scores, so the effect of normalisation is in every report
            plain = winoground_scores(raw, raw)
            metrics.update(image_score_unnormalized=plain["image_score"],
                           group_score_unnormalized=plain["group_score"])
    metrics["nfe_per_example"] = float(np.mean(nfe))
    return metrics


def evaluate_matching(matcher: ImageTextMatcher, task: str, examples: Sequence[WinogroundExample | CaptionPair],
                      run_dir: str | Path, run_config: dict, examples_per_batch: int = 8, progress: bool = True,
                      group: ProcessGroup | None = None, normalize: str | None = None,
                      max_new: int | None = None) -> dict | None:
    """Score every example not yet in the store (at most `max_new` of them); return the metrics of everything
    stored, with "complete" saying whether every example is (rank 0 only)."""
    from tqdm import tqdm

    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose from classification, {', '.join(TASKS)}")
    group = group or ProcessGroup()
    for example in examples:  # every example's captions, before anything is scored or stored
        matcher.check_texts(example.captions)
    config = {**run_config, "task": task, **matcher.describe()}
    if group.is_main:
        with ResultsStore(run_dir, config):
            pass  # creates the store and records the configuration once
    group.barrier()
    with ResultsStore(run_dir, config) as store:
        done = store.done_indices()
        todo = group.shard(store.pending(len(examples), max_new))
        bar = tqdm(total=len(todo), disable=not progress or not group.is_main, unit="ex", dynamic_ncols=True,
                   desc=task if group.world_size == 1 else f"{task} (rank 0 of {group.world_size})")
        for start in range(0, len(todo), examples_per_batch):
            batch = todo[start:start + examples_per_batch]
            chosen = [examples[i] for i in batch]
            groups = _example_groups(task, chosen)
            scored = matcher.score_groups(groups, [[f"{ex.id}/{j}" for j in range(len(images))]
                                                   for ex, (images, _) in zip(chosen, groups)])
            store.add([_row(i, ex, task, s) for i, ex, s in zip(batch, chosen, scored)])
            bar.update(len(batch))
        bar.close()
        group.barrier()
        if not group.is_main:
            return None
        rows = store.db.execute("SELECT ranking, nfe FROM results WHERE status = 'ok' ORDER BY idx").fetchall()
    metrics = metrics_from_rows(task, [json.loads(r[0]) for r in rows], [r[1] for r in rows], normalize)
    metrics["examples_this_run"] = len(rows) - len(done)
    metrics["complete"] = len(rows) == len(examples)
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", Path(run_dir) / "metrics.json")
    return metrics

