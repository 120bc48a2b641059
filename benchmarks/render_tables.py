"""Render the README's results tables (markdown) from the benchmarks' JSON files.

    python benchmarks/render_tables.py
"""

import json
from pathlib import Path

from common import model_fingerprint

RESULTS = Path(__file__).resolve().parent / "results"


def print_stale_note(model: str, measured_sha: str | None) -> None:
    """A line under a table measured on other weights than the model now shipped under that name."""
    current = model_fingerprint(model)
    if measured_sha is None or measured_sha == current:
        return
    print(f"*Measured on earlier weights of `{model}` (sha256 {measured_sha[:10]}), not on the ones shipped now "
            f"({current[:10]}); rerun its command above to update.*\n")


def print_paired(title: str, baseline: str, variant: str, rows: list[dict]) -> None:
    print(f"{title}\n")
    print(f"| timesteps (NFE) | {baseline} | {variant} | paired difference |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['timesteps']} ({r['nfe']}) | {100 * r['baseline']:.1f}% | {100 * r['variant']:.1f}% | "
              f"{100 * r['paired_difference']:+.1f} +- {100 * r['paired_standard_error']:.1f} |")
    print()


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main():
    fm = load("fashion_mnist")
    if fm and "accuracy" in fm:
        print("**Accuracy vs cost** (Fashion-MNIST test images, fixed seeded subset; 1 torch thread per process)\n")
        print("| model | images | strategy | NFE / image (mean, p95) | accuracy (+- standard error) | "
              "s / image (from NFE) |")
        print("|---|---|---|---|---|---|")
        for r in fm["accuracy"]:
            print(f"| {r['model']} | {r['images']} | {r['strategy']} | {r['nfe_mean']:.0f}, {r['nfe_p95']:.0f} | "
                  f"{100 * r['accuracy']:.1f}% +- {100 * r['accuracy_standard_error']:.1f} | "
                  f"{r['seconds_per_image']:.2f} |")
        print()
    if fm and "cnn" in fm:
        c = fm["cnn"]
        print(f"CNN reference ({fm['meta']['cnn']['images']} images of the same subset): {100 * c['accuracy']:.1f}% "
              f"after {c['minutes']} min "
              f"({c['epochs']:.1f} epochs, no augmentation).\n")
    if fm and "wordings" in fm:
        print(f"**Text model, wordings** ({fm['meta']['wordings']['images']} test images, exhaustive)\n")
        print("| wording | NFE / image | accuracy | text encoder alone: labels nearest a training caption of "
              "their class |")
        print("|---|---|---|---|")
        for r in fm["wordings"]:
            encoder = f"{r['encoder_nearest_caption_correct']}/{len(r['labels'])}"
            print(f"| {r['wording']} | {r['nfe_per_image']:.0f} | {100 * r['accuracy']:.1f}% | {encoder} |")
        print()
    if fm and "wordings_grid" in fm:
        g = fm["wordings_grid"]
        print_paired(f"**Held-out template, paired** ({g['images']} test images, class names in \"{g['template']}\" "
                     "vs the training wording, same timesteps and noise)", "training wording", "held-out template",
                     g["rows"])
    if fm and "ablation" in fm:
        a = fm["ablation"]
        n = fm["meta"]["ablation"]["images"]
        print(f"**Single-timestep accuracy** (class model, {n} test images): " + ", ".join(
            f"t={r['t']}: {100 * r['accuracy']:.1f}%" for r in a["single_timestep"]))
        s = a["spacing"]
        print(f"\n{s['n_timesteps']} of the {s['grid']}-grid's timesteps, evenly spaced: {100 * s['even']:.1f}%, "
              f"seeded random: {100 * s['random']:.1f}%\n")
        if "weighting" in a:
            w = a["weighting"]
            print(f"All {s['grid']} timesteps, per-timestep weights fitted on half the images (NLL) vs the plain "
                  f"sum, judged on the other half (mean of both folds): fitted {100 * w['fitted']:.1f}%, "
                  f"uniform {100 * w['uniform']:.1f}%\n")
        for loss, rows in a.get("loss", {}).get("variants", {}).items():
            print_paired(f"**Loss, paired** (class model, {a['loss']['images']} test images, the same timesteps and "
                         "noise)", "l2", loss, rows)
    if fm and "coldstart" in fm:
        print("**Cold start** of `classify` on one image, 25 timesteps (measured on an otherwise idle 2-core "
              "machine; imports, loading and scoring: medians, measured in separate fresh processes)\n")
        print("| model | CLI wall (median) | CLI wall, each run | imports | loading | scoring |")
        print("|---|---|---|---|---|---|")
        for r in fm["coldstart"]:
            each = ", ".join(f"{t:.1f}" for t in r.get("cli_seconds_all", [r["cli_seconds"]]))
            print(f"| {r['model']} | {r['cli_seconds']:.1f} s | {each} | {r['imports']:.1f} s | "
                  f"{r['loading']:.1f} s | {r['scoring_25_timesteps']:.1f} s |")
        print()
    render_efficiency(load("efficiency"))
    render_robustness(load("robustness"))
    for path in sorted(RESULTS.glob("robustness_*.json")):  # other runs of a few families or rows (--out)
        render_robustness(load(path.stem), title=f"Robustness, `{path.stem}`")
    mem = load("memory")
    if mem:
        print("**Memory**: " + ", ".join(f"{r['images']} images: peak RSS {r['peak_rss_mib']:.0f} MiB"
                                         for r in mem["rows"]) + "\n")


def render_efficiency(eff):
    if not eff:
        return
    if "strategies" in eff:
        meta = eff["meta"]["strategies"]
        print(f"**Strategies** ({meta['images']} test images, {meta['model']}, same images and noise for every row; "
              "seconds per image estimated from NFE unless measured)\n")
        print("| strategy | accuracy | mean NFE | p95 NFE | s / image |")
        print("|---|---|---|---|---|")
        for r in eff["strategies"]:
            seconds = f"{r['seconds_per_image']:.2f}" + (" (measured)" if r.get("seconds") == "measured" else "")
            print(f"| {r['strategy']} | {100 * r['accuracy']:.1f}% | {r['nfe_mean']:.0f} | {r['nfe_p95']:.0f} | "
                  f"{seconds} |")
        print()
        print_stale_note(meta["model"], meta.get("model_weights_sha256"))
    if "throughput" in eff:
        t = eff["throughput"]
        print(f"**Engine throughput** ({t['images']} images, one process, one thread; images/s)\n")
        print("| strategy | batched engine | one image at a time | speedup | network share of engine wall |")
        print("|---|---|---|---|---|")
        print(f"| exhaustive {t['timesteps']} (loop: the original code's layout, batches of {t['loop_batch_size']}) | "
              f"{t['engine_images_per_s']:.2f} | {t['loop_images_per_s']:.2f} | {t['speedup']:.2f}x | "
              f"{100 * t['network_share_of_wall']:.1f}% |")
        if "elimination" in t:
            e = t["elimination"]
            print(f"| elimination {e['error_rate']} (mean network batch {e['engine_mean_batch']:.0f} vs "
                  f"{e['loop_mean_batch']:.0f}) | {e['engine_images_per_s']:.2f} | {e['loop_images_per_s']:.2f} | "
                  f"{e['speedup']:.2f}x | {100 * e['network_share_of_wall']:.1f}% |")
        print(f"\nPredictions agree on {100 * t['prediction_agreement']:.0f}% of images." + (
            " The network forward alone runs at " + ", ".join(
                f"{rate:.0f}" for rate in t["forward_nfe_per_s_by_batch"].values()) + " evaluations/s at batch "
            "sizes " + ", ".join(t["forward_nfe_per_s_by_batch"]) + "." if "forward_nfe_per_s_by_batch" in t
            else "") + "\n")
        meta = eff["meta"]["throughput"]
        print_stale_note(meta["model"], meta.get("model_weights_sha256"))
    if "calibration" in eff:
        c = eff["calibration"]
        b, a = c["before (T=1)"], c["after"]
        print(f"**Calibration** (exhaustive {c['strategy'].get('n_timesteps')} timesteps; temperature fitted on "
              f"{c['fit_images']} test images, judged on {c['held_out_images']} others): T = {c['temperature']:.3g}; "
              f"NLL {b['nll']:.3f} -> {a['nll']:.3f}; ECE {b['ece']:.3f} -> {a['ece']:.3f}." + (
                  f" Per-timestep weights instead: NLL {c['per_timestep_weights']['nll']:.3f}, ECE "
                  f"{c['per_timestep_weights']['ece']:.3f}." if "per_timestep_weights" in c else "") + "\n")
        meta = eff["meta"]["calibration"]
        print_stale_note(meta["model"], meta.get("model_weights_sha256"))


def render_robustness(rob, title="Robustness"):
    if not rob:
        return
    variants = [k for k in rob["rows"][0] if k not in ("family", "severity", "cnn", "correct")]
    paired = rob.get("change_minus_cnn_change", {}).get(variants[-1])  # older results lack per-image data
    print(f"**{title}** ({rob['images']} test images, class model, {rob['timesteps']} timesteps; "
          "accuracy, and in brackets the change from clean" + (
              f"; last column: {variants[-1]}'s change minus the CNN's, paired over images, +- standard error"
              if paired else "") + ")\n")
    print("| shift | " + " | ".join(variants) + " | CNN |" + (" vs CNN |" if paired else ""))
    print("|---|" + "---|" * (len(variants) + 1 + bool(paired)))
    clean = rob["rows"][0]
    for r in rob["rows"]:
        name = (r["family"] + " " + r["severity"]).strip()
        cells = [f"{100 * r[v]:.1f}%" + ("" if r is clean else f" ({100 * (r[v] - clean[v]):+.1f})")
                 for v in variants + ["cnn"]]
        if paired:
            d = paired.get(f"{r['family']} {r['severity']}")
            cells.append(f"{100 * d['mean']:+.1f} +- {100 * d['standard_error']:.1f}" if d else "")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print_stale_note(rob["model"], rob.get("model_weights_sha256"))


if __name__ == "__main__":
    main()
