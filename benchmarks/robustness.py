"""Effective robustness on Fashion-MNIST: plain vs robust diffusion classifier vs a CNN reference.

    python -m benchmarks.robustness --images 1000
    python -m benchmarks.robustness --images 200 --families "gaussian noise" contrast brightness
    python -m benchmarks.robustness --images 1000 --timesteps 10 --families "gaussian noise" \
        --variants plain "robust (both)" --out robustness_noise_n1000

Same test images (the fixed seeded subset of benchmarks/common.py) for every row. Rows are saved as
they finish; a rerun with the same model, timesteps and images reuses them (add families in later runs). For each shift
family and severity (benchmarks/shifts.py): accuracy of the plain diffusion classifier, of the robust
one (--noise-aware and --normalize-intensity, each also alone), and of the CNN reference. Clean accuracy
of every variant is reported too, so robustness bought with clean accuracy shows. Writes
benchmarks/results/robustness.json and robustness.png (accuracy under shift against clean accuracy).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffusion_classifier import DiffusionClassifier, Exhaustive, load_denoiser
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.stats import standard_error

from .common import (
    RESULTS,
    accuracy_of,
    cnn_correct,
    cnn_reference,
    correct_from_string,
    correct_string,
    model_fingerprint,
    test_subset,
    to_pixels,
)
from .shifts import FAMILIES

VARIANTS = {"plain": {}, "noise-aware": {"noise_aware": True}, "normalized": {"normalize_intensity": True},
            "robust (both)": {"noise_aware": True, "normalize_intensity": True}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="fashion-mnist-class")
    parser.add_argument("--timesteps", type=int, default=25)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--shifts", nargs="+", default=None,
                        help='only these shifts, named "FAMILY SEVERITY" as in the table (e.g. "blur sigma 1.0")')
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--cnn-minutes", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--out", default="robustness",
                        help="results name: RESULTS/OUT.json and OUT.png (e.g. a larger-sample check of a few rows)")
    args = parser.parse_args()
    tune_cpu_allocator()
    subset = test_subset(args.images)
    images, labels = fashion_mnist_arrays("test")
    pixels, labels = to_pixels(images[subset]), labels[subset]
    cnn, cnn_info = cnn_reference(args.cnn_minutes)
    denoiser = load_denoiser(args.model)
    args.weights = model_fingerprint(args.model)
    classifiers = {name: DiffusionClassifier(denoiser, strategy=Exhaustive(args.timesteps), batch_size=args.batch_size,
                                             **options) for name, options in VARIANTS.items() if name in args.variants}
    conditions = [("clean", "", lambda x: x)] + [(family, label, fn) for family in args.families
                                                  for label, fn in FAMILIES[family]
                                                  if not args.shifts or f"{family} {label}" in args.shifts]
    done = previous_rows(args, len(subset), list(classifiers))
    rows = []
    header = f"{'shift':<28}" + "".join(f"{name:>16}" for name in classifiers) + f"{'CNN':>10}"
    print(header, flush=True)
    for family, severity, shift in conditions:
        row = done.pop((family, severity), None)
        if row is None:
            shifted = shift(pixels)
            cnn_ok = cnn_correct(cnn, shifted, labels)
            row = {"family": family, "severity": severity, "cnn": float(cnn_ok.mean()),
                   "correct": {"cnn": correct_string(cnn_ok)}}
            for name, clf in classifiers.items():
                result = accuracy_of(clf, shifted, labels)
                row[name], row["correct"][name] = result["accuracy"], result["correct"]
        rows.append(row)
        print(f"{(family + ' ' + severity).strip():<28}" + "".join(f"{row[n]:>16.4f}" for n in classifiers)
              + f"{row['cnn']:>10.4f}", flush=True)
        # after every row, with the earlier run's other rows: a stopped run keeps its rows and resumes
        save(args, len(subset), cnn_info, rows + list(done.values()), list(classifiers))
    rows += list(done.values())
    plot(rows, list(classifiers), RESULTS / f"{args.out}.png")


def previous_rows(args, n_images: int, variants: list[str]) -> dict:
    """Rows of an earlier run with the same model weights, timesteps, images and variants, keyed by shift."""
    path = RESULTS / f"{args.out}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    if ((old.get("model"), old.get("model_weights_sha256"), old.get("timesteps"), old.get("images"))
            != (args.model, args.weights, args.timesteps, n_images)):
        return {}
    return {(r["family"], r["severity"]): r for r in old["rows"] if all(v in r for v in variants)}


def save(args, n_images: int, cnn_info: dict, rows: list[dict], variants: list[str]) -> None:
    order = ["clean "] + [f"{family} {label}" for family in FAMILIES for label, _ in FAMILIES[family]]
    rows = sorted(rows, key=lambda r: order.index(f"{r['family']} {r['severity']}"))
    clean = rows[0]
    drops = {name: {f"{r['family']} {r['severity']}": clean[name] - r[name] for r in rows[1:]}
             for name in variants + ["cnn"]}
    out = {"model": args.model, "model_weights_sha256": args.weights, "timesteps": args.timesteps, "images": n_images,
           "test_indices_rule": "np.sort(np.random.default_rng(0).permutation(10000)[:N])", "cnn": cnn_info,
           "rows": rows, "accuracy_drop_from_clean": drops,
           "change_minus_cnn_change": {name: paired_vs_cnn(rows, name) for name in variants},
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(json.dumps(out, indent=2) + "\n", RESULTS / f"{args.out}.json")


def paired_vs_cnn(rows: list[dict], variant: str) -> dict:
    """Per shift: mean and standard error over images of (variant's change from clean) - (CNN's change).

    The same images under every row make this a paired difference: negative means the variant lost more
    than the CNN. The target "loses less than the CNN" is met beyond sampling error when mean - 2 SE > 0."""
    def change(row, name):
        return correct_from_string(row["correct"][name]) - correct_from_string(rows[0]["correct"][name])

    out = {}
    for r in rows[1:]:
        d = change(r, variant) - change(r, "cnn")
        out[f"{r['family']} {r['severity']}"] = {"mean": float(d.mean()),
                                                 "standard_error": standard_error(d)}
    return out


def plot(rows, variants, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for i, name in enumerate(variants + ["cnn"]):
        clean = rows[0][name] + 0.004 * i  # a small offset keeps variants with equal clean accuracy apart
        ax.scatter([clean] * (len(rows) - 1), [r[name] for r in rows[1:]], label=name, s=14)
    ax.plot([0, 1], [0, 1], "k--", lw=0.5)
    ax.set(xlabel="clean accuracy", ylabel="accuracy under shift (each point a shift)", xlim=(0.6, 1),
           ylim=(0, 1), title="Fashion-MNIST effective robustness")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
