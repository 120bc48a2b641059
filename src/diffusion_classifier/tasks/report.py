"""Re-analysis of a stored run without the model: `report` on any task's run (the task says what its report
holds), and classification's report: metrics, re-scoring with other timesteps or prompt aggregation, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..adapters.schedules import even_subset
from ..engine.probabilities import ranking
from ..errors import UserError
from ..runtime import atomic_write_text
from ..store import Row, read_run


def rescore(errors: np.ndarray, timesteps: list[int], aggregate: str = "min", t_min: int = 0,
            t_max: int | None = None, columns: np.ndarray | None = None) -> int:
    """Predicted class from a stored error matrix [classes, prompts, columns], using only some timesteps.

    Classes evaluated at more of the chosen timesteps rank first (they survived pruning), then by
    mean error; with several prompts, min or mean over the prompts' mean errors.
    """
    ts = np.asarray(timesteps)
    keep = (ts >= t_min) & (ts <= (t_max if t_max is not None else ts.max()))
    if columns is not None:
        keep &= np.isin(np.arange(len(ts)), columns)
    if not keep.any():
        raise UserError(f"no stored timestep lies in [{t_min}, {t_max}]")
    return int(ranking(errors[:, :, keep], aggregate)[0])


def build_report(run_dir: str | Path, aggregate: str | None = None, t_min: int = 0, t_max: int | None = None,
                 plots: bool = True) -> dict:
    """The report of a stored run of any task, written to RUN_DIR/report/report.json (and plots)."""
    from . import task_of

    run_dir = Path(run_dir)
    config, rows = read_run(run_dir)
    task = task_of(config)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    report = task.report(run_dir, config, rows, aggregate, t_min, t_max, plots)
    atomic_write_text(json.dumps(report, indent=2) + "\n", out / "report.json")
    return report


def report_lines(report: dict) -> list[str]:
    """What `report` prints."""
    from . import get_task

    return get_task(report.get("task", "classification")).report_lines(report)


def classification_report(run_dir: Path, config: dict, rows: list[Row], aggregate: str | None = None,
                          t_min: int = 0, t_max: int | None = None, plots: bool = True) -> dict:
    labels = config.get("labels") or []
    n_classes = len(labels)
    aggregate = aggregate or config.get("aggregate", "min")
    ok = [r for r in rows if r.ok]
    if not ok:
        raise UserError(f"{run_dir} has no classified images yet")
    truth = np.array([r.label for r in ok])
    by_idx = {r.idx: (r.error_matrix(), r.timestep_list()) for r in ok}
    predictions = np.array([rescore(*by_idx[r.idx], aggregate, t_min, t_max) for r in ok])
    correct = predictions == truth
    confusion = np.zeros((n_classes, n_classes), dtype=int)
    np.add.at(confusion, (truth, predictions), 1)
    per_class = [float(correct[truth == c].mean()) for c in range(n_classes) if (truth == c).any()]
    nfe = np.array([r.nfe for r in ok])
    seconds = np.array([r.seconds for r in ok])
    report = {
        "run": str(run_dir), "task": "classification", "model": config.get("model"),
        "strategy": config.get("strategy"), "rescoring": {"aggregate": aggregate, "t_min": t_min, "t_max": t_max},
        "accuracy": float(correct.mean()), "accuracy_stderr": float(np.sqrt(correct.mean() * (1 - correct.mean())
                                                                            / len(correct))),
        "mean_per_class_accuracy": float(np.mean(per_class)),
        "images": len(ok), "failed": len(rows) - len(ok),
        "failures": [{"id": r.id, "reason": r.error} for r in rows if not r.ok][:50],
        "stored_accuracy": float(np.mean([r.correct for r in ok])),
        "nfe": {"mean": float(nfe.mean()), "p50": float(np.percentile(nfe, 50)), "p95": float(np.percentile(nfe, 95))},
        "seconds_per_image": {"mean": float(seconds.mean()), "p95": float(np.percentile(seconds, 95))},
        "labels": labels, "confusion_matrix": confusion.tolist(),
    }
    report["accuracy_vs_timesteps"] = _accuracy_vs_timesteps(ok, by_idx, truth, aggregate, t_min, t_max)
    report["error_by_timestep"] = _error_by_timestep(ok, by_idx, truth, t_min, t_max)
    if plots:
        _plots(report, run_dir / "report")
    return report


def classification_report_lines(report: dict) -> list[str]:
    lines = [f"{report['run']}: {report['images']} images ({report['failed']} failed)",
             f"  accuracy {report['accuracy']:.4f}   mean per-class {report['mean_per_class_accuracy']:.4f}   "
             f"(as stored: {report['stored_accuracy']:.4f})",
             f"  NFE per image mean {report['nfe']['mean']:.0f}, p95 {report['nfe']['p95']:.0f};   "
             f"seconds per image mean {report['seconds_per_image']['mean']:.3f}"]
    t_min, t_max = report["rescoring"]["t_min"], report["rescoring"]["t_max"]
    if t_min or t_max is not None:
        lines.append(f"  accuracies above and below use only the stored timesteps in [{t_min}, "
                     f"{'the largest' if t_max is None else t_max}]")
    lines += [f"  {row['timesteps']:>4} timesteps: accuracy {row['accuracy']:.4f}"
              for row in report["accuracy_vs_timesteps"]]
    return lines


def _within(t: int, t_min: int, t_max: int | None) -> bool:
    return t >= t_min and (t_max is None or t <= t_max)


def _accuracy_vs_timesteps(ok, by_idx, truth, aggregate, t_min: int = 0, t_max: int | None = None) -> list[dict]:
    """For exhaustive runs: accuracy when only k evenly spaced stored timesteps (of those in [t_min, t_max])
    are used."""
    first, timesteps = by_idx[ok[0].idx]
    if not np.isfinite(first).all():
        return []  # pruned candidates: subsets of timesteps are not comparable across classes
    order = np.array([i for i in np.argsort(timesteps) if _within(timesteps[i], t_min, t_max)])
    n = len(order)
    rows = []
    for k in sorted({1, 2, 5, 10, 25, 50, 100, 250, 500, n} & set(range(1, n + 1))):
        columns = order[even_subset(range(n), k)]
        predictions = [rescore(*by_idx[r.idx], aggregate, columns=columns) for r in ok]
        rows.append({"timesteps": k, "accuracy": float(np.mean(np.array(predictions) == truth))})
    return rows


def _error_by_timestep(ok, by_idx, truth, t_min: int = 0, t_max: int | None = None) -> dict:
    """Mean error at each stored timestep in [t_min, t_max] for the true class and for the other classes."""
    sums: dict[int, list[float]] = {}
    for r, label in zip(ok, truth):
        errors, timesteps = by_idx[r.idx]
        per_class = np.nanmin(errors, axis=1)  # best prompt
        for col, t in enumerate(timesteps):
            if not _within(t, t_min, t_max):
                continue
            others = np.delete(per_class[:, col], label)
            entry = sums.setdefault(t, [0.0, 0, 0.0, 0])
            if np.isfinite(per_class[label, col]):
                entry[0] += per_class[label, col]
                entry[1] += 1
            finite = others[np.isfinite(others)]
            entry[2] += finite.sum()
            entry[3] += len(finite)
    ts = sorted(sums)
    return {"timesteps": ts,
            "true_class": [sums[t][0] / sums[t][1] if sums[t][1] else None for t in ts],
            "other_classes": [sums[t][2] / sums[t][3] if sums[t][3] else None for t in ts]}


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, confusion = report["labels"], np.array(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(labels), 1 + 0.45 * len(labels)))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    if len(labels) <= 20:
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=6)
    ax.set(xlabel="predicted", ylabel="true", title=f"accuracy {report['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)

    if report["accuracy_vs_timesteps"]:
        rows = report["accuracy_vs_timesteps"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["timesteps"] for r in rows], [r["accuracy"] for r in rows], "o-")
        ax.set(xscale="log", xlabel="evenly spaced timesteps used", ylabel="accuracy")
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_timesteps.png", dpi=120)
        plt.close(fig)

    e = report["error_by_timestep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(e["timesteps"], e["true_class"], label="true class")
    ax.plot(e["timesteps"], e["other_classes"], label="other classes")
    ax.set(xlabel="timestep t", ylabel="mean error", title="error by timestep")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error_by_timestep.png", dpi=120)
    plt.close(fig)
