"""Write docs/datasets.md from the dataset presets (src/diffusion_classifier/resources/datasets/*.json).

    python tools/render_datasets.py            # rewrite docs/datasets.md
    python tools/render_datasets.py --check    # exit 1 when it is not what the presets give
"""

import argparse
import sys
from pathlib import Path

from diffusion_classifier.tasks.presets import PRESET_NAMES, preset

DOC = Path(__file__).resolve().parents[1] / "docs" / "datasets.md"

HEAD = """# Dataset presets: the paper's datasets, and Fashion-MNIST

`--preset NAME` (API: `preset=NAME`, or `preset(NAME)` for the preset itself) supplies a dataset's class
names in its label order and the paper's prompts, unless `--labels` / `--template` are given, and the
paper's staged schedule and loss, unless `--strategy`, `--n-samples` or `--to-keep` are. With
`evaluate --data FOLDER`, the class folders of an ImageFolder are mapped onto the label order: a folder
is named by the class, by the dataset's own folder name (ImageNet WordNet ids, Food-101's `apple_pie`),
or by the label id (from 0; folders numbered 1..K with no 0, as Flowers-102's originals, count from 1).
Case, `_` and repeated spaces are ignored. Every class of the preset is a candidate, even when the folder
holds only some of them. Class-conditional models (DiT, our class models) score only their own classes:
with a preset, the preset's label order must be the model's class order (most names agreeing, as DiT's
ImageNet classes do with the imagenet preset); a model trained on other classes is refused, not renamed.
An explicit `--timesteps`, `--strategy`, `--n-samples` or `--to-keep` always wins over the preset's schedule.

The presets are data files in `src/diffusion_classifier/resources/datasets/`; this page is generated
from them by `python tools/render_datasets.py`. The paper's accuracy is Diffusion Classifier's zero-shot
accuracy with Stable Diffusion 2.0 (Li et al. 2023, Table 1); nothing here was run on the paper's datasets
on our machines (no downloads). `fashion-mnist` is ours: the dataset of the shipped models, and the
demo's names and prompt (`make demo` is `classify ... --preset fashion-mnist`).

| preset | dataset | classes | prompt | staged schedule (timesteps, classes kept) | loss | paper, SD 2.0 |
|---|---|---|---|---|---|---|
"""


def render() -> str:
    rows, layouts = [], []
    for name in PRESET_NAMES:
        p = preset(name)
        prompt = f"`{p.templates[0]}`" + (" (the paper's own prompt per class, e.g. "
                                          f"`{p.prompts[0][0]}`)" if p.prompts else "")
        staged = (" / ".join(f"{n}, keep {k}" for n, k in zip(p.strategy.n_samples, p.strategy.to_keep))
                  if p.strategy else "none in the paper: exhaustive by default")
        accuracy = f"{100 * p.paper_accuracy:.1f}%" if p.paper_accuracy is not None else "not reported"
        rows.append(f"| `{name}` | {p.title} | {len(p.classes)} | {prompt} | {staged} | {p.loss or 'l2'} | "
                    f"{accuracy} |")
        layouts.append(f"* `{name}`: {p.layout}.")
    example = ("\n## Example\n\n```bash\n# CIFAR-10 test images in class folders (airplane/, automobile/, ...):\n"
               "diffusion-classifier evaluate --model stabilityai/stable-diffusion-2-base --data cifar10-test/ "
               "\\\n    --preset cifar10 --device cuda --out runs/cifar10 --json\n```\n")
    return HEAD + "\n".join(rows) + "\n\n## Expected layouts\n\n" + "\n".join(layouts) + "\n" + example


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    text = render()
    if parser.parse_args().check:
        if not DOC.is_file() or DOC.read_text() != text:
            sys.exit(f"{DOC} is stale: run python tools/render_datasets.py")
        return
    DOC.write_text(text)


if __name__ == "__main__":
    main()
