"""Fashion-MNIST benchmark of the shipped models: accuracy vs NFE, zero-shot wordings, a CNN
reference, a timestep ablation, and the cold-start time of `classify`.

    python -m benchmarks.fashion_mnist --images 2000            # everything
    python -m benchmarks.fashion_mnist --images 500 --sections accuracy cnn
    python -m benchmarks.fashion_mnist --images 1000 --sections accuracy --models fashion-mnist-text

The accuracy section replaces only the rows of the models it ran (each row states its image count).

Test images: a fixed subset of the 10k test set, numpy.random.default_rng(0).permutation(10000)[:N],
sorted; the indices are written to the JSON. Each section merges its results into
benchmarks/results/fashion_mnist.json (so sections can be run separately) and prints a table.

The accuracy section scores each model once with `diffusion-classifier evaluate` (exhaustive over an
even grid of --grid timesteps, resumable, in benchmarks/runs/MODEL-WEIGHTSHASH-testN-gridG/, so a
retrained model starts a new run) and replays every row's strategy on the stored errors. It prints the
evaluate command it runs; on a machine with more cores, run that command first under
`torchrun --nproc-per-node K -m diffusion_classifier ...` and the benchmark finds the run complete.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import (
    DiffusionClassifier,
    Elimination,
    EvaluationRun,
    Exhaustive,
    Staged,
    load_denoiser,
    run_evaluation,
)
from diffusion_classifier.adapters.text_unet import sentence_embedding
from diffusion_classifier.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays
from diffusion_classifier.engine.strategies import FixedTimesteps
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.stats import standard_error
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.training.captions import CaptionBank, load_captions

from .common import (
    RESULTS,
    RUNS,
    accuracy_of,
    cnn_accuracy,
    cnn_reference,
    grid_run_dirs,
    grid_run_name,
    model_fingerprint,
    replayed_accuracy,
    replayed_decisions,
    test_subset,
    to_pixels,
)

ROOT = Path(__file__).resolve().parent
RESOURCES = ROOT.parent / "src" / "diffusion_classifier" / "resources" / "fashion_mnist.json"
SECTIONS = ["accuracy", "wordings", "cnn", "ablation", "coldstart"]


# ----- sections ---------------------------------------------------------------------------

def section_accuracy(pixels, labels, args, out):
    """Per model, one resumable `evaluate` run (exhaustive over an even grid of --grid timesteps, full error
    matrices stored), then each row's strategy replayed on those errors: exactly its decisions and NFE
    (noise is keyed by image and timestep), for the cost of the one pass."""
    rows = []
    for model in args.models:
        denoiser = load_denoiser(model)
        errors, grid, truth, seconds_per_nfe = grid_run(denoiser, model, len(labels), args)
        g = len(grid)
        strategies = {f"exhaustive, {k} timesteps (evenly from the {g}-grid)":
                      FixedTimesteps(evenly_from(grid, k)) for k in args.timesteps if k < g}
        strategies[f"exhaustive, {g} timesteps"] = Exhaustive(g)
        strategies[f"staged {g // 5}/{g} keep 3/1"] = Staged([g // 5, g], [3, 1])
        strategies[f"elimination error_rate=0.05 (max {g} timesteps)"] = Elimination(0.05, max_timesteps=g)
        for name, strategy in strategies.items():
            row = {"model": model, "model_weights_sha256": model_fingerprint(model), "strategy": name,
                   "config": strategy.describe(),
                   **replayed_accuracy(strategy, errors, grid, truth, denoiser.num_train_timesteps)}
            row["seconds_per_image"] = row["nfe_mean"] * seconds_per_nfe
            rows.append(row)
            print(f"{model:<20} {name:<48} acc {row['accuracy']:.4f} +- {row['accuracy_standard_error']:.4f}  "
                  f"NFE {row['nfe_mean']:.0f}  ~{row['seconds_per_image']:.3f} s/img", flush=True)
    out["accuracy"] = rows


def evenly_from(grid: list[int], k: int) -> list[int]:
    """k evenly spaced timesteps of a grid (every (g // k)-th, centred like the staged schedule's grids)."""
    step = len(grid) // k
    return [int(t) for t in grid[step // 2::step][:k]]


def grid_run(denoiser, model: str, n_images: int, args, template: str = "a photo of a {}.", variant: str = "",
             extra: dict | None = None) -> tuple[list[np.ndarray], list[int], np.ndarray, float]:
    """Run (or resume) the evaluation run over the fixed test subset; return its error matrices.

    It is what `diffusion-classifier evaluate` runs with the arguments printed here, so it can be run
    beforehand on more processes (torchrun --nproc-per-node 2 -m diffusion_classifier evaluate ...).
    Text models take `template` (the training wording by default). A run with another template or `extra`
    scoring settings (e.g. {"loss": "l1"}) is named by its `variant` tag."""
    run_dir = Path(args.runs_dir) / grid_run_name(model, n_images, args.grid, variant)
    run_dir.mkdir(parents=True, exist_ok=True)
    subset_file = run_dir / "subset.txt"
    atomic_write_text("".join(f"{i}\n" for i in test_subset(n_images)), subset_file)
    text = denoiser.conditioning == "text"
    reuse = [other for other in (grid_run_dirs(model, args.grid, Path(args.runs_dir)) if not variant else [])
             if other != run_dir and (other / "results.sqlite").exists()]  # nested subsets: a smaller run's
    run = EvaluationRun(model=model, data="fashion-mnist", split="test", subset=test_subset(n_images).tolist(),
                        out=run_dir, templates=[template] if text else None, reuse=tuple(reuse),
                        scoring={"strategy": Exhaustive(args.grid), "seed": 0, "batch_size": args.batch_size,
                                 **(extra or {})})
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in (extra or {}).items())
    print(f"python -m diffusion_classifier evaluate --data fashion-mnist --split test --subset {subset_file} "
          f"--model {model} --strategy exhaustive --timesteps {args.grid} --seed 0 --batch-size {args.batch_size} "
          f"--out {run_dir}" + (f" --template '{template}'" if text else "") + (f" {flags}" if flags else "")
          + "".join(f" --reuse {other}" for other in reuse), flush=True)
    if not run_complete(run_dir, n_images):
        run_evaluation(run, denoiser=denoiser, progress=False)
    store = ResultsStore(run_dir)
    try:
        matrices = store.error_matrices()
        records = {r["idx"]: r for r in store.records()}
    finally:
        store.close()
    if len(matrices) != n_images:
        raise SystemExit(f"{run_dir}: {len(matrices)} of {n_images} images scored")
    grid = matrices[0][2]
    truth = np.array([records[idx]["label"] for idx, _, _ in matrices])
    seconds_per_nfe = sum(r["seconds"] for r in records.values()) / sum(r["nfe"] for r in records.values())
    return [m for _, m, _ in matrices], grid, truth, seconds_per_nfe


def run_complete(run_dir: Path, n_images: int) -> bool:
    if not (run_dir / "results.sqlite").exists():
        return False
    store = ResultsStore(run_dir)
    try:
        return len(store.done_indices()) == n_images
    finally:
        store.close()


def section_wordings(pixels, labels, args, out):
    spec = json.loads(RESOURCES.read_text())
    denoiser = load_denoiser(args.text_model)
    variants = {
        "training wording: class names, 'a photo of a {}.'": (FASHION_MNIST_CLASSES, ["a photo of a {}."]),
        "training wording: first synonym, '{}'": ([s[0] for s in spec["train_synonyms"]], ["{}"]),
        "held-out synonyms, held-out template": ([s[0] for s in spec["heldout_synonyms"]],
                                                 [spec["heldout_templates"][0]]),
        "class names, held-out template": (FASHION_MNIST_CLASSES, [spec["heldout_templates"][1]]),
    }
    bank = CaptionBank(FASHION_MNIST_CLASSES, *load_captions("", FASHION_MNIST_CLASSES))
    trained = sentence_embeddings(denoiser, bank.captions[1:])
    trained_class = torch.tensor([c for c, indices in enumerate(bank.by_class) for _ in indices])
    rows = []
    for name, (labels_text, templates) in variants.items():
        clf = DiffusionClassifier(denoiser, labels=labels_text, templates=templates,
                                  strategy=Exhaustive(args.wording_timesteps), batch_size=args.batch_size)
        nearest = trained_class[(sentence_embeddings(denoiser, [templates[0].format(w) for w in labels_text])
                                 @ trained.T).argmax(1)]
        row = {"wording": name, "labels": labels_text, "templates": templates,
               "encoder_nearest_caption_class": [FASHION_MNIST_CLASSES[c] for c in nearest],
               "encoder_nearest_caption_correct": int((nearest == torch.arange(len(nearest))).sum()),
               **accuracy_of(clf, pixels, labels)}
        rows.append(row)
        print(f"{name:<55} acc {row['accuracy']:.4f}  NFE {row['nfe_per_image']:.0f}  text encoder alone: "
              f"{row['encoder_nearest_caption_correct']}/10 labels nearest a training caption of their class",
              flush=True)
    out["wordings"] = rows
    if args.wording_grid_images:
        out["wordings_grid"] = heldout_template_grid(denoiser, spec["heldout_templates"][1], args)


def heldout_template_grid(denoiser, template: str, args) -> dict:
    """Class names in a held-out template against the training wording on the accuracy section's images."""
    n, model = args.wording_grid_images, args.text_model
    trained, grid, truth, _ = grid_run(denoiser, model, n, args)
    heldout, _, _, _ = grid_run(denoiser, model, n, args, template=template, variant="heldout-template")
    rows = paired_rows(trained, heldout, grid, truth, [*args.timesteps, len(grid)], f"held-out template '{template}'")
    return {"template": template, "images": n, "rows": rows}


def paired_rows(baseline, variant, grid, truth, counts, name) -> list[dict]:
    """Accuracy of two exhaustive runs over the same grid, images and noise with k evenly spaced grid timesteps
    for each k in counts, and the paired difference (variant - baseline) with its standard error."""
    rows = []
    for k in counts:
        strategy = FixedTimesteps(evenly_from(grid, k))
        (base, _), (other, _) = (replayed_decisions(strategy, errors, grid, truth) for errors in (baseline, variant))
        difference = other.astype(float) - base
        rows.append({"timesteps": k, "nfe": k * int(baseline[0].shape[0]), "baseline": float(base.mean()),
                     "variant": float(other.mean()), "paired_difference": float(difference.mean()),
                     "paired_standard_error": standard_error(difference)})
        print(f"{k} timesteps, {len(truth)} images: baseline {rows[-1]['baseline']:.4f}  {name} "
              f"{rows[-1]['variant']:.4f}  paired {100 * rows[-1]['paired_difference']:+.2f} +- "
              f"{100 * rows[-1]['paired_standard_error']:.2f} points", flush=True)
    return rows


@torch.inference_mode()
def sentence_embeddings(denoiser, texts: list[str]) -> torch.Tensor:
    """The text encoder's sentence embeddings (the pooling of `--text-pooling mean`), one row per text.

    A diagnostic independent of the diffusion model: if a label's embedding is nearest to training captions
    of another class, no amount of diffusion training makes that wording work."""
    tokens = denoiser.tokenizer(texts, padding=True, return_tensors="pt")
    return sentence_embedding(denoiser.text_encoder(**tokens)[0], tokens.attention_mask)[:, 0]


def section_cnn(pixels, labels, args, out):
    model, info = cnn_reference(args.cnn_minutes)
    out["cnn"] = {**info, "accuracy": cnn_accuracy(model, pixels, labels)}
    print(f"CNN reference ({info['epochs']:.1f} epochs in {args.cnn_minutes} min): acc {out['cnn']['accuracy']:.4f}")


def section_ablation(pixels, labels, args, out):
    """Replayed on the class model's accuracy-section run (no extra network evaluations): each single
    timestep of the grid alone, evenly spaced vs seeded random grid timesteps at equal NFE, and fitted
    per-timestep weights vs the uniform sum (two-fold: weights fitted on one seeded half, judged on the other)."""
    denoiser = load_denoiser("fashion-mnist-class")
    errors, grid, truth, _ = grid_run(denoiser, "fashion-mnist-class", len(labels), args)
    T = denoiser.num_train_timesteps

    def accuracy(timesteps):
        return replayed_accuracy(FixedTimesteps(timesteps), errors, grid, truth, T)["accuracy"]

    picks = np.linspace(0, len(grid) - 1, 12).round().astype(int)
    single = [{"t": int(grid[i]), "accuracy": accuracy([grid[i]])} for i in picks]
    for row in single:
        print(f"single timestep t={row['t']:<4} acc {row['accuracy']:.4f}", flush=True)
    n, g = args.ablation_timesteps, len(grid)
    if n >= g:
        raise SystemExit(f"--ablation-timesteps {n} must be below the grid's {g} timesteps")
    even = evenly_from(grid, n)
    random_ts = sorted(np.random.default_rng(0).choice(grid, n, replace=False).tolist())
    spacing = {"n_timesteps": n, "grid": g, "even": accuracy(even), "random": accuracy(random_ts),
               "even_timesteps": even, "random_timesteps": random_ts}
    print(f"{n} of the {g}-grid's timesteps: evenly spaced {spacing['even']:.4f}   random {spacing['random']:.4f}")
    weighting = fitted_weighting(errors, grid, truth)
    print(f"all {g} grid timesteps, held-out halves: uniform sum {weighting['uniform']:.4f}   "
          f"fitted per-timestep weights {weighting['fitted']:.4f}")
    out["ablation"] = {"model": "fashion-mnist-class", "single_timestep": single, "spacing": spacing,
                       "weighting": weighting}
    if args.ablation_loss_images:  # fresh network evaluations: --ablation-loss-images x grid x classes per loss
        n = args.ablation_loss_images
        if n > len(labels):
            raise SystemExit(f"--ablation-loss-images {n} must not exceed --images {len(labels)}")
        # the l2 baseline is the accuracy section's run: the n-image subset is nested in it (both sorted)
        keep = np.searchsorted(test_subset(len(labels)), test_subset(n))
        baseline, loss_truth = [errors[i] for i in keep], truth[keep]
        out["ablation"]["loss"] = {"images": n, "baseline": "l2", "variants": {}}
        for loss in args.ablation_losses:
            variant, _, _, _ = grid_run(denoiser, "fashion-mnist-class", n, args, variant=f"loss-{loss}",
                                        extra={"loss": loss})
            out["ablation"]["loss"]["variants"][loss] = paired_rows(baseline, variant, grid, loss_truth,
                                                                    [*args.timesteps, len(grid)], f"loss {loss}")


def fitted_weighting(errors, grid, truth) -> dict:
    """Accuracy of argmin over classes of sum_t w_t error[c, t] with w fitted (calibration.fit_timestep_weights,
    NLL on one half of the images) against equal weights, both judged on the other half; mean of both folds."""
    from diffusion_classifier.engine.probabilities import timestep_gaps
    from diffusion_classifier.tasks.calibration import fit_timestep_weights

    gaps = np.stack([timestep_gaps(e, grid, int(e.min(axis=1).mean(axis=1).argmin())) for e in errors])
    order = np.random.default_rng(0).permutation(len(truth))
    halves = order[: len(order) // 2], order[len(order) // 2:]
    uniform, fitted = [], []
    for fit, held in (halves, halves[::-1]):
        weights = fit_timestep_weights(gaps[fit], truth[fit])
        uniform.append(np.mean(gaps[held].sum(axis=2).argmin(axis=1) == truth[held]))
        fitted.append(np.mean((gaps[held] * weights).sum(axis=2).argmin(axis=1) == truth[held]))
    return {"uniform": float(np.mean(uniform)), "fitted": float(np.mean(fitted)), "folds": 2,
            "images": len(truth)}


def section_coldstart(pixels, labels, args, out):
    """`classify` on one image from a fresh interpreter, --coldstart-repeats times per model (the median is the
    figure; the spread shows how much the disk cache and other load move it), and the same split into imports,
    model loading and scoring by coldstart_child.py."""
    image = ROOT.parent / "examples" / "fashion-mnist" / "test00002-trouser.png"
    cli = [sys.executable, "-m", "diffusion_classifier", "classify", str(image), "--model"]
    rows = []
    for model in ("fashion-mnist-class", "fashion-mnist-text"):
        totals, parts = [], []
        for _ in range(args.coldstart_repeats):
            started = time.perf_counter()
            subprocess.run(cli + [model, "--timesteps", "25"], check=True, capture_output=True)
            totals.append(time.perf_counter() - started)
            child = subprocess.run([sys.executable, str(ROOT / "coldstart_child.py"), model, str(image)],
                                   check=True, capture_output=True, text=True)
            parts.append([float(x) for x in child.stdout.split()[-3:]])
        imports, loading, scoring = np.median(parts, axis=0)
        rows.append({"model": model, "cli_seconds": float(np.median(totals)), "cli_seconds_all": totals,
                     "imports": float(imports), "loading": float(loading), "scoring_25_timesteps": float(scoring)})
        print(f"{model:<20} classify (CLI, cold) median {np.median(totals):.1f} s of "
              f"{', '.join(f'{t:.1f}' for t in totals)}   imports {imports:.1f}  load {loading:.1f}  "
              f"score {scoring:.1f}", flush=True)
    out["coldstart"] = rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="test images (fixed seeded subset)")
    parser.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=["fashion-mnist-class", "fashion-mnist-text"],
                        help="models of the accuracy section")
    parser.add_argument("--grid", type=int, default=50, help="timesteps of the accuracy section's exhaustive pass")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[10, 25],
                        help="exhaustive rows replayed on subsets of the grid")
    parser.add_argument("--runs-dir", default=str(RUNS),
                        help="where the accuracy section's evaluate runs live (resumable)")
    parser.add_argument("--wording-timesteps", type=int, default=25)
    parser.add_argument("--wording-grid-images", type=int, default=0,
                        help="also score class names in a held-out template on this many images over the --grid "
                             "timesteps, paired with the accuracy section's run (0: skip)")
    parser.add_argument("--text-model", default="fashion-mnist-text", help="text model of the wordings section")
    parser.add_argument("--ablation-timesteps", type=int, default=10,
                        help="timesteps of the even-vs-random spacing comparison (drawn from the grid)")
    parser.add_argument("--ablation-loss-images", type=int, default=0,
                        help="also score the class model with other losses than l2 on this many images over the "
                             "--grid timesteps, paired with l2 (0: skip)")
    parser.add_argument("--ablation-losses", nargs="+", default=["l1", "huber"], choices=["l1", "huber"])
    parser.add_argument("--cnn-minutes", type=float, default=4.0)
    parser.add_argument("--coldstart-repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default=str(RESULTS / "fashion_mnist.json"))
    args = parser.parse_args()
    tune_cpu_allocator()
    subset = test_subset(args.images)
    images, labels = fashion_mnist_arrays("test")
    pixels, labels = to_pixels(images[subset]), labels[subset]
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for section in args.sections:
        section_result: dict = {}
        globals()[f"section_{section}"](pixels, labels, args, section_result)
        if section == "accuracy":  # models can be run separately (and on different numbers of images)
            others = [r for r in results.get("accuracy", []) if r["model"] not in args.models]
            section_result["accuracy"] = others + section_result["accuracy"]
        results.update(section_result)
        results.setdefault("meta", {})[section] = {
            "images": len(subset), "test_indices_rule": "np.sort(np.random.default_rng(0).permutation(10000)[:N])",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__}
        atomic_write_text(json.dumps(results, indent=2) + "\n", out_path)


if __name__ == "__main__":
    main()
