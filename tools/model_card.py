"""Write a shipped model's card (README.md) from its training summary and the benchmark results.

    python tools/model_card.py fashion-mnist-class "diffusion-classifier train ..." [--sessions NOTE]
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "src" / "diffusion_classifier" / "models"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("command", help="the exact train command line")
    parser.add_argument("--summary", required=True, help="training_summary.json of the run")
    parser.add_argument("--note", default="", help="extra line about how the run was done")
    args = parser.parse_args()
    summary = json.loads(Path(args.summary).read_text())
    config = summary["config"]
    index = json.loads((MODELS / args.name / "model_index.json").read_text())
    unet = json.loads((MODELS / args.name / "unet" / "config.json").read_text())
    conditioning = ("class ids" if config["conditioning"] == "class"
                    else "text captions through the frozen all-MiniLM-L6-v2 encoder")
    pairs = config.get("layout") == "pairs"
    data = ("28 x 56 canvases of two Fashion-MNIST training items side by side (or one item on one side, "
            f"{config.get('single_prob', 0.2):.0%} of samples), drawn afresh every step from the 60,000 training "
            "images (diffusion_classifier.training.pairs.PairSampler)" if pairs else
            "the 60,000 Fashion-MNIST training images (28x28, grayscale")
    objective = ("rectified flow (velocity prediction)" if config.get("objective") == "flow"
                 else "epsilon prediction, DDPM linear schedule with 1,000 steps")
    lines = [
        f"# {args.name}",
        "",
        f"A {summary['parameters'] / 1e6:.2f}M-parameter pixel-space {unet['_class_name']} "
        f"({conditioning}) trained with {objective} on {data}, scaled to [-1, 1]; Debian's "
        f"dataset-fashion-mnist{')' if not pairs else ''}. Weights are the EMA (decay {config['ema_decay']}).",
        "",
        "## Training",
        "",
        "```bash",
        args.command,
        "```",
        "",
        f"- steps: {summary['steps']:,} of batch {config['batch_size']} = {summary['images_seen']:,} images "
        f"({summary['epochs']:.2f} epochs)",
        f"- training time: {summary['train_seconds'] / 60:.1f} minutes of wall time in all on a 2-core CPU machine "
        f"(1 torch thread; the other core trained another model at the same time)",
        f"- final loss (mean of the last 500 steps): {summary['final_loss']:.4f}",
        f"- class names: {', '.join(index['class_names'])}",
    ]
    if pairs:
        lines.append("- captions: resources/fashion_mnist_pairs.json, each item's name or a training synonym in one "
                     "of the 6 training templates (\"{left} to the left of {right}\", \"{right} to the right of "
                     "{left}\", ...), single items as \"{item} on the {side}\"; "
                     f"{config['empty_caption_prob']:.0%} empty captions, at most {config['max_text_length']} "
                     "tokens; the UNet cross-attends to the encoder's token states, with attention mask")
    elif config["conditioning"] == "text":
        conditioning_on = "the encoder's token states, with attention mask"
        if config.get("text_pooling") == "mean":
            conditioning_on = "the encoder's sentence embedding (`--text-pooling mean`)"
        lines.append("- captions: class names and synonyms x 8 templates from resources/fashion_mnist.json "
                     f"(train_* entries), {config['empty_caption_prob']:.0%} empty captions, at most "
                     f"{config['max_text_length']} tokens; the UNet cross-attends to {conditioning_on}")
    if args.note:
        lines.append(f"- {args.note}")
    fm = json.loads((RESULTS / "fashion_mnist.json").read_text()) if (RESULTS / "fashion_mnist.json").exists() else {}
    rows = [r for r in fm.get("accuracy", []) if r["model"] == args.name]
    if rows:
        n = rows[0]["images"]
        lines += ["", f"## Benchmark ({n} Fashion-MNIST test images, benchmarks/fashion_mnist.py --sections accuracy)",
                  "", "| strategy | NFE / image (mean, p95) | accuracy (+- standard error) |", "|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['strategy']} | {r['nfe_mean']:.0f}, {r['nfe_p95']:.0f} | "
                         f"{100 * r['accuracy']:.1f}% +- {100 * r['accuracy_standard_error']:.1f} |")
    comp = json.loads((RESULTS / "compositional.json").read_text()) if (RESULTS / "compositional.json").exists() else {}
    if pairs and comp.get("diffusion", {}).get("model") == args.name:
        d = comp["diffusion"]
        lines += ["", f"## Benchmark ({d['examples']} held-out Winoground-style examples from the test split, "
                  "benchmarks/compositional.py)", "", "| timesteps | image score normalised | NFE / example | text | "
                  "image | group |", "|---|---|---|---|---|---|"]
        for r in d["rows"]:
            lines.append(f"| {r['timesteps']} | {r['image_normalize']} | {r['nfe_per_example']} | "
                         + " | ".join(f"{100 * r[k]:.1f}% +- {100 * r[k + '_stderr']:.1f}"
                                      for k in ("text_score", "image_score", "group_score")) + " |")
        if "singles" in comp:
            s = comp["singles"]
            lines += ["", f"One item on a random side among the 20 captions \"{{item}} on the {{side}}\" "
                      f"({s['images']} test items, {s['timesteps']} timesteps): {100 * s['accuracy']:.1f}% "
                      f"(item {100 * s['item_accuracy']:.1f}%, side {100 * s['side_accuracy']:.1f}%)."]
    lines += ["", "Resume training: re-run the command above with `--out` pointing at a directory holding "
              "`checkpoint.pt` (see checkpoints/ in the repository) and a larger `--max-minutes`.", ""]
    (MODELS / args.name / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
