"""Temperature calibration of predict_proba, fitted on stored runs (no model needed).

probabilities = softmax(-relative_error / T), relative_error being each class's mean error minus the
leader's on the same timesteps. T is fitted by minimising the negative log-likelihood of the true
labels (a 1-D golden-section search on log T), on one part of a labelled run, and judged on the rest.
Any task's run serves: its Task says what the decisions are (classification: each image among the classes;
image-text tasks: each image among its example's captions, the right one being its own).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..engine.probabilities import (
    expected_calibration_error,
    negative_log_likelihood,
    softmax_of_errors,
    weighted_probabilities,
)
from ..errors import UserError
from ..runtime import atomic_write_text
from ..store import STORE_NAME, ResultsStore, read_run

CALIBRATION_FILE = "calibration.json"
MIN_FIT_IMAGES = 20


def fit_temperature(relative: np.ndarray, labels: np.ndarray, low: float = 1e-6, high: float = 1e2) -> float:
    """The temperature minimising NLL (golden-section search over log T; NLL is unimodal in log T here)."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    f = lambda log_t: negative_log_likelihood(softmax_of_errors(relative, math.exp(log_t)), labels)  # noqa: E731
    fc, fd = f(c), f(d)
    for _ in range(100):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def fit_timestep_weights(gaps: np.ndarray, labels: np.ndarray, steps: int = 200) -> np.ndarray:
    """Per-timestep weights w for probabilities softmax(-sum_t w_t gap[c, t]), fitted by NLL.

    gaps: [images, classes, timesteps], each class's error minus the leader's at each shared timestep
    (exhaustive runs: every class at the same timesteps). A temperature is the special case of equal
    weights 1/(T n); free weights let informative timesteps count more and noisy ones less.
    """
    import torch

    x = torch.as_tensor(gaps, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    scale = float(x.abs().mean()) or 1.0  # start from a sensible temperature, in the data's units
    w = torch.full((x.shape[2],), 1.0 / (scale * x.shape[2]), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(-(x * w).sum(dim=2), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy()


def relative_errors_of_run(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A stored run's decisions: ([decisions, options] each option's error minus the best one's, right options)."""
    from . import task_of

    config, rows = read_run(run_dir)
    relative, labels = task_of(config).choices(config, rows)
    if len(labels) < 4:
        raise UserError(f"{run_dir} has {len(labels)} scored decisions; calibration needs a labelled run of more")
    return relative, labels


def calibrate_run(run_dir: str | Path, fit_fraction: float = 0.5, seed: int = 0, per_timestep: bool = False) -> dict:
    """Fit T (and optionally per-timestep weights) on a seeded random part of the run; report NLL and ECE
    before (T=1) and after on the rest."""
    if not 0 < fit_fraction < 1:
        raise UserError("--fit-fraction must lie in (0, 1)")
    relative, labels = relative_errors_of_run(run_dir)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_fit = max(2, int(round(fit_fraction * len(labels))))
    if n_fit < MIN_FIT_IMAGES or len(labels) - n_fit < 1:
        raise UserError(f"{run_dir} has {len(labels)} scored decisions, so the fit would rest on {n_fit}; calibrate "
                        f"fits on at least {MIN_FIT_IMAGES} (and judges on the rest): with fewer, the temperature "
                        "says more about which images were drawn than about the model. Evaluate more images")
    fit, held = order[:n_fit], order[n_fit:]
    temperature = fit_temperature(relative[fit], labels[fit])

    def judge(probs: np.ndarray) -> dict:
        return {"nll": negative_log_likelihood(probs, labels[held]),
                "ece": expected_calibration_error(probs, labels[held])}

    result = {"temperature": temperature, "fit_images": int(len(fit)), "held_out_images": int(len(held)),
              "fitted_on": fitted_on(run_dir),
              "before": judge(softmax_of_errors(relative[held], 1.0)),
              "after": judge(softmax_of_errors(relative[held], temperature)), "seed": seed}
    if per_timestep:
        from . import task_of

        config, rows = read_run(run_dir)
        gaps, _, timesteps = task_of(config).timestep_gaps(config, rows)
        weights = fit_timestep_weights(gaps[fit], labels[fit])
        result.update(timesteps=timesteps, timestep_weights=weights.tolist(),
                      after_per_timestep=judge(weighted_probabilities(gaps[held], weights)))
    atomic_write_text(json.dumps(result, indent=2) + "\n", Path(run_dir) / CALIBRATION_FILE)
    return result


FIRST_LOOK_FILE = "first_look.json"


def first_look_of_run(run_dir: str | Path, n_timesteps: int = 2, miss_rate: float = 0.02,
                      look_run: str | Path | None = None):
    """Fit a first look (shortlists.fit_first_look) on an exhaustive run's errors; write RUN_DIR/first_look.json.

    The run's labels are not used: the first look learns where exhaustive scoring's winner sits, so any
    images like the ones to be classified serve, labelled or not. With `look_run` (an exhaustive run of the
    same images and candidates on the same grid, at a lower --resolution) the look is fitted on that run's
    errors against this run's winners, and scores at its resolution."""
    from ..engine.shortlists import fit_first_look, per_timestep
    from . import task_of

    config, rows = read_run(run_dir)
    errors, grid = task_of(config).error_grids(config, rows)
    aggregate = config.get("aggregate", "min")
    if look_run is None:
        first = fit_first_look(errors, grid, n_timesteps, miss_rate, aggregate)
    else:
        look_config, look_rows = read_run(look_run)
        look_errors, look_grid = task_of(look_config).error_grids(look_config, look_rows)
        resolution, own = look_config.get("resolution"), config.get("resolution")
        if resolution is None:
            raise UserError(f"{look_run} was not scored at a chosen --resolution: a look run is an exhaustive run of "
                            "the same images at a lower one")
        if own is not None and resolution >= own:
            raise UserError(f"{look_run} was scored at {resolution} px, not below {run_dir}'s {own} px")
        if [r.id for r in look_rows if r.ok] != [r.id for r in rows if r.ok]:
            raise UserError(f"{look_run} and {run_dir} do not hold the same images in the same order")
        if look_config.get("labels") != config.get("labels") or len(look_grid) != len(grid):
            raise UserError(f"{look_run} and {run_dir} must score the same candidates on grids of the same size")
        if look_config.get("model_weights_sha256") != config.get("model_weights_sha256"):
            raise UserError(f"{look_run} and {run_dir} were scored by different models")
        winners = per_timestep(errors, aggregate).mean(axis=2).argmin(axis=1)  # as fit_first_look's own
        first = fit_first_look(look_errors, look_grid, n_timesteps, miss_rate, aggregate, winners=winners,
                               resolution=int(resolution))
    first.save(Path(run_dir) / FIRST_LOOK_FILE)
    return first


CASCADE_FILE = "cascade.json"


# each family twice (2 timesteps for every group, then 4 more for the groups still in) and a first fine stage of
# 1-3 timesteps chosen on held-out images: the structure that cost least at 1,000 classes (docs/results.md)
DEFAULT_LEVELS = (2, 4)
DEFAULT_FIRST_WITH_LEVELS = (1, 2, 3)


def cascade_of_run(run_dir: str | Path, first: int | list[int] | None = None, miss_rate: float = 0.05,
                   families: list[dict] | None = None, levels: list[tuple[int, int | list[int]]] | None = None):
    """Fit a cascade (shortlists.fit_cascade, its stages by default; `first` one size or options) on an exhaustive
    run's errors; write RUN_DIR/cascade.json. As for a first look, the images' true labels are not used.

    With `families` (CoarseToFine's {coarse label: [class labels]} dicts) the cascade has coarse levels: the run
    must have scored every coarse label as a candidate beside the classes (evaluate --labels naming both); the
    classes are the run's other labels. `levels`: (family index, timesteps or options) per level, in order (default
    each family twice, DEFAULT_LEVELS); `first` defaults to 1, or to options 1-3 with levels."""
    from ..engine.shortlists import fit_cascade
    from . import task_of

    config, rows = read_run(run_dir)
    errors, grid = task_of(config).error_grids(config, rows)
    aggregate = config.get("aggregate", "min")
    if not families:
        if levels:
            raise UserError("coarse levels need the families they score (--families)")
        cascade = fit_cascade(errors, grid, miss_rate, 1 if first is None else first, aggregate=aggregate)
    else:
        labels = _run_labels(config, errors.shape[1], run_dir)
        classes, coarse_errors = _split_coarse(labels, errors, families, run_dir)
        if levels is None:
            levels = [(f, k) for f in range(len(families)) for k in DEFAULT_LEVELS]
        for number, _ in levels:
            if not 0 <= number < len(families):
                raise UserError(f"a coarse level names family {number}; there are {len(families)} (numbered from 0)")
        row = {label: i for i, label in enumerate(labels)}
        fine = errors[:, [row[c] for c in classes]]
        cascade = fit_cascade(fine, grid, miss_rate, list(DEFAULT_FIRST_WITH_LEVELS) if first is None else first,
                              aggregate=aggregate, labels=classes,
                              levels=[(families[f], coarse_errors[f], ks) for f, ks in levels])
    cascade.save(Path(run_dir) / CASCADE_FILE)
    return cascade


def _run_labels(config: dict, candidates: int, run_dir: str | Path) -> list[str]:
    labels = config.get("labels")
    if not isinstance(labels, list) or len(labels) != candidates:
        raise UserError(f"{run_dir} does not record its {candidates} candidates' labels")
    return [str(label) for label in labels]


def _split_coarse(labels: list[str], errors: np.ndarray, families: list[dict], run_dir: str | Path):
    """(the class labels: the run's labels no family names as coarse, each family's coarse errors in its order)."""
    coarse = {label for family in families for label in family}
    missing = sorted(coarse - set(labels))
    if missing:
        raise UserError(f"{run_dir} did not score the coarse label {missing[0]!r}: evaluate with --labels (or "
                        "--labels-file) naming the classes and every coarse label")
    classes = [label for label in labels if label not in coarse]
    known = set(classes)
    for family in families:
        for group, members in family.items():
            stray = [m for m in members if m not in known]
            if stray:
                raise UserError(f"coarse group {group!r} holds {stray[0]!r}, which is not a class of {run_dir}")
    row = {label: i for i, label in enumerate(labels)}
    return classes, [errors[:, [row[group] for group in family]] for family in families]


def fitted_on(run_dir: str | Path) -> dict:
    """The settings of a run a temperature fitted on it holds for (classifier.stored_temperature_applies)."""
    with ResultsStore(run_dir) as store:
        config = store.config()
    return {"strategy": config.get("strategy"),
            "scoring": {k: config.get(k) for k in ("loss", "target", "grid", "weighting", "aggregate")}}


def read_calibration(path: str | Path) -> dict:
    """calibration.json (or a run directory holding one): temperature, per-timestep weights if fitted, and the
    settings it was fitted at (`fitted_on`; files written before it was recorded take it from the run beside
    them, when there is one)."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text())
        out = {"temperature": float(data["temperature"])}
        if "fitted_on" in data:
            out["fitted_on"] = data["fitted_on"]
        elif (path.parent / STORE_NAME).is_file():
            out["fitted_on"] = fitted_on(path.parent)
        if "timestep_weights" in data:
            out["timestep_weights"] = dict(zip(map(int, data["timesteps"]), map(float, data["timestep_weights"])))
        return out
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read a calibration from {path}: {exc}") from None
