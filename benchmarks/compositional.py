"""Compositional benchmark on Fashion-MNIST pairs: does the diffusion model read word order?

    python -m benchmarks.compositional                          # every section, 400 held-out examples
    python -m benchmarks.compositional --sections diffusion singles --examples 400
    python -m benchmarks.compositional --sections contrastive --contrastive-minutes 20

Held-out examples: `pairs.winoground_examples` over the Fashion-MNIST *test* split (seed 0), half of them
with the held-out templates, written as a Winoground manifest to runs/compositional/ (regenerated, not
committed). Sections:
  * diffusion: `diffusion-classifier evaluate --task winoground` of the pairs model, exhaustive over an
    even grid (stored in benchmarks/runs/, replayable): text / image / group scores with and without
    unconditional normalisation, at 10 / 25 / 50 timesteps (replayed), and the elimination strategy over
    the two captions of each image (replayed) against exhaustive on the text score, with NFE;
  * contrastive: CLIP-style and NegCLIP-style references (benchmarks/contrastive.py) trained for
    --contrastive-minutes each on the composites and captions the diffusion model trains on;
  * singles: one test item on a random side, classified among the 20 captions "{item} on the {side}";
  * encoder: how far the frozen text encoder's sentence embedding and token states move when the two
    items of a caption are swapped (a pooled embedding that barely moves cannot carry word order).
Results merge into benchmarks/results/compositional.json; a table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier import EvaluationRun, run_evaluation
from diffusion_classifier.adapters.schedules import even_subset
from diffusion_classifier.data import fashion_mnist_arrays
from diffusion_classifier.engine.replay import replay
from diffusion_classifier.engine.strategies import Elimination, Exhaustive
from diffusion_classifier.runtime import atomic_write_text, tune_cpu_allocator
from diffusion_classifier.stats import paired_difference
from diffusion_classifier.store import ResultsStore
from diffusion_classifier.tasks.matching.metrics import binomial_error, winoground_outcomes, winoground_scores
from diffusion_classifier.training.pairs import ITEM, compose, load_spec, winoground_examples, write_winoground

from .common import RESULTS, RUNS, model_fingerprint

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "runs" / "compositional"
SECTIONS = ["diffusion", "contrastive", "singles", "encoder"]


def test_examples(n: int):
    images, labels = fashion_mnist_arrays("test")
    return winoground_examples(images, labels, n, seed=0)


def manifest_for(n: int) -> Path:
    manifest = DATA / f"test{n}" / "manifest.jsonl"
    if not manifest.is_file():
        write_winoground(test_examples(n), manifest.parent)
    return manifest


# ----- sections ---------------------------------------------------------------------------

def section_diffusion(args, out: dict) -> None:
    manifest = manifest_for(args.examples)
    tag = f"{Path(args.model).name}-{model_fingerprint(args.model)[:10]}"
    run_dir = RUNS / f"compositional-{tag}-test{args.examples}-grid{args.grid}"
    out["diffusion"] = score_diffusion(args.model, manifest, run_dir, args.grid, args.batch_size, args.error_rate)


def score_diffusion(model: str | Path, manifest: Path, run_dir: Path, grid: int, batch_size: int,
                    error_rate: float = 0.05, denoiser=None, limit: int | None = None) -> dict:
    """`evaluate --task winoground` of a model, exhaustive on `grid` timesteps (stored in run_dir), then the
    text / image / group scores at 10 / 25 / grid timesteps with and without unconditional normalisation, and
    elimination over the two captions replayed on the stored errors. `denoiser`: the model already loaded."""
    run = EvaluationRun(model=str(model), data=manifest, out=run_dir, task="winoground", limit=limit,
                        scoring={"strategy": Exhaustive(grid), "batch_size": batch_size})
    print(f"evaluate --task winoground --data {manifest} --model {model} --out {run_dir} "
          f"--timesteps {grid} --batch-size {batch_size}" + (f" --limit {limit}" if limit else ""), flush=True)
    started = time.perf_counter()
    run_evaluation(run, denoiser=denoiser, progress=False)
    seconds = time.perf_counter() - started
    with ResultsStore(run_dir) as store:
        rows = store.rows()
    errors = np.stack([r.error_matrix() for r in rows])  # [examples, 2 images, 2 captions + null, grid]
    timesteps = rows[0].timestep_list()[0]
    tags = [json.loads(r.ranking)["tag"] for r in rows]
    order = np.argsort(timesteps)
    rows_out = []
    for k in sorted({k for k in (10, 25) if k < grid} | {grid}):
        cols = order[even_subset(range(len(timesteps)), k)]
        e = errors[..., cols]
        raw = -e[:, :, :2].mean(axis=-1)
        normalized = -(e[:, :, :2] - e[:, :, 2:3]).mean(axis=-1)
        for name, image in (("unconditional", normalized), ("none", raw)):
            s = winoground_scores(raw, image, tags)
            rows_out.append({"timesteps": k, "image_normalize": name, "nfe_per_example": 2 * (2 + (name != "none")) * k,
                             **{key: s[key] for key in s if key != "by_tag"}, "by_tag": s.get("by_tag")})
    # elimination over the two captions of each image, replayed on the exhaustive grid: text score and NFE
    exhaustive = winoground_outcomes(-errors[:, :, :2].mean(axis=-1))["text"]
    strategy = Elimination(error_rate, max_timesteps=grid)
    winners, nfe = [], []
    for example in errors:
        per_image = []
        for image in example:
            table = replay(strategy, image[:2, None, :], timesteps, 1000)
            per_image.append(int(table.ranking()[0]))
            nfe.append(table.nfe)
        winners.append(per_image)
    winners = np.array(winners)
    text_elim = (winners[:, 0] == 0) & (winners[:, 1] == 1)
    diff, diff_se = paired_difference(text_elim, exhaustive)
    root = Path(__file__).resolve().parent.parent
    return {
        "model": str(model), "weights_sha256": model_fingerprint(model), "examples": len(rows),
        "run": str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
        "seconds": round(seconds, 1), "rows": rows_out,
        "elimination": {"error_rate": error_rate, "text_score": float(text_elim.mean()),
                        "text_score_stderr": binomial_error(text_elim),
                        "exhaustive_text_score": float(exhaustive.mean()), "paired_difference": diff,
                        "paired_difference_stderr": diff_se, "nfe_per_example": float(np.sum(nfe) / len(rows)),
                        "exhaustive_nfe_per_example": 2 * 2 * grid}}


def section_contrastive(args, out: dict) -> None:
    from diffusion_classifier.training.pairs import PairSampler

    from .contrastive import train_contrastive, winoground_scores_of

    images, labels = fashion_mnist_arrays("train")
    items = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    sampler = PairSampler(items, torch.as_tensor(labels), load_spec())
    examples = test_examples(args.examples)
    tags = [ex.tag for ex in examples]
    out["contrastive"] = {"examples": len(examples), "threads": torch.get_num_threads(), "rows": []}
    for name, hard in (("CLIP-style (in-batch negatives)", False), ("NegCLIP-style (+ swapped captions)", True)):
        model, summary = train_contrastive(sampler, args.contrastive_minutes, hard_negatives=hard)
        scores = winoground_scores_of(model, examples)
        s = winoground_scores(scores, scores, tags)
        out["contrastive"]["rows"].append({"name": name, **summary, **s})
        print(f"{name}: text {s['text_score']:.3f} image {s['image_score']:.3f} group {s['group_score']:.3f} "
              f"({summary['steps']} steps, {summary['minutes']} min)", flush=True)


def section_singles(args, out: dict) -> None:
    from diffusion_classifier import DiffusionClassifier

    images, labels = fashion_mnist_arrays("test")
    spec = load_spec()
    rng = np.random.default_rng(1)
    chosen = rng.choice(len(images), args.singles, replace=False)
    sides = rng.integers(0, 2, args.singles)
    canvases = [compose(images[i], None) if s == 0 else compose(None, images[i]) for i, s in zip(chosen, sides)]
    names = [f"{name} on the {side}" for side in spec["sides"] for name in spec["names"]]  # 20 candidates
    clf = DiffusionClassifier.from_pretrained(args.model, labels=names, strategy=Exhaustive(args.singles_timesteps),
                                              batch_size=args.batch_size)
    started = time.perf_counter()
    predictions = np.array([r.prediction_index for r in clf.classify(canvases)])
    truth = sides * len(spec["names"]) + labels[chosen]
    item_ok = predictions % len(spec["names"]) == labels[chosen]
    side_ok = predictions // len(spec["names"]) == sides
    out["singles"] = {"images": int(args.singles), "timesteps": args.singles_timesteps, "candidates": len(names),
                      "accuracy": float(np.mean(predictions == truth)),
                      "accuracy_stderr": binomial_error(predictions == truth),
                      "item_accuracy": float(item_ok.mean()), "side_accuracy": float(side_ok.mean()),
                      "nfe_per_image": len(names) * args.singles_timesteps,
                      "seconds": round(time.perf_counter() - started, 1)}


def section_encoder(args, out: dict) -> None:
    from diffusion_classifier.adapters.text_unet import sentence_embedding

    from .contrastive import token_states

    examples = test_examples(args.examples)
    first = [ex.caption_0 for ex in examples]
    second = [ex.caption_1 for ex in examples]
    s0, m0 = token_states(first)
    s1, m1 = token_states(second)
    pooled = torch.nn.functional.cosine_similarity(sentence_embedding(s0, m0)[:, 0], sentence_embedding(s1, m1)[:, 0])
    tokens = torch.nn.functional.cosine_similarity(s0.flatten(1), s1.flatten(1))
    out["encoder"] = {"examples": len(examples),
                      "pooled_cosine": {"mean": float(pooled.mean()), "min": float(pooled.min())},
                      "token_states_cosine": {"mean": float(tokens.mean()), "min": float(tokens.min())}}


# ----- output -----------------------------------------------------------------------------

def print_tables(results: dict) -> None:
    d = results.get("diffusion")
    if d:
        print(f"\ndiffusion model {d['model']} on {d['examples']} held-out examples")
        print(f"{'timesteps':>9} {'image norm.':>13} {'NFE/ex':>7} {'text':>13} {'image':>13} {'group':>13}")
        for r in d["rows"]:
            cells = [f"{100 * r[k]:5.1f} +- {100 * r[k + '_stderr']:3.1f}" for k in ("text_score", "image_score",
                                                                                   "group_score")]
            print(f"{r['timesteps']:>9} {r['image_normalize']:>13} {r['nfe_per_example']:>7} " + " ".join(
                f"{c:>13}" for c in cells))
        e = d["elimination"]
        print(f"elimination {e['error_rate']}: text {100 * e['text_score']:.1f} at {e['nfe_per_example']:.0f} NFE vs "
              f"exhaustive {100 * e['exhaustive_text_score']:.1f} at {e['exhaustive_nfe_per_example']} "
              f"(paired {100 * e['paired_difference']:+.1f} +- {100 * e['paired_difference_stderr']:.1f})")
    for r in results.get("contrastive", {}).get("rows", []):
        print(f"{r['name']}: text {100 * r['text_score']:.1f} image {100 * r['image_score']:.1f} group "
              f"{100 * r['group_score']:.1f} ({r['minutes']} min, {r['steps']} steps)")
    s = results.get("singles")
    if s:
        print(f"singles: {100 * s['accuracy']:.1f}% of {s['images']} (item {100 * s['item_accuracy']:.1f}%, side "
              f"{100 * s['side_accuracy']:.1f}%) among {s['candidates']} captions at {s['nfe_per_image']} NFE")
    e = results.get("encoder")
    if e:
        print(f"encoder: swapped captions' cosine, pooled {e['pooled_cosine']['mean']:.4f} (min "
              f"{e['pooled_cosine']['min']:.4f}), token states {e['token_states_cosine']['mean']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--examples", type=int, default=400, help="held-out Winoground-style examples")
    parser.add_argument("--model", default="fashion-mnist-pairs")
    parser.add_argument("--grid", type=int, default=50, help="timesteps of the exhaustive run")
    parser.add_argument("--error-rate", type=float, default=0.05, help="elimination's error rate")
    parser.add_argument("--contrastive-minutes", type=float, default=20.0, help="training budget per reference")
    parser.add_argument("--singles", type=int, default=200, help="single-item test images")
    parser.add_argument("--singles-timesteps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default=str(RESULTS / "compositional.json"))
    args = parser.parse_args()
    tune_cpu_allocator()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "canvas": f"{ITEM} x {2 * ITEM}",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}
    for section in args.sections:
        new: dict = {}
        globals()[f"section_{section}"](args, new)
        results.update(new)
        results.setdefault("meta", {})[section] = meta
        atomic_write_text(json.dumps(results, indent=2) + "\n", out_path)
    print_tables(results)


if __name__ == "__main__":
    main()
