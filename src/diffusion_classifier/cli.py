"""Command-line interface: a thin layer over the library."""

from __future__ import annotations

import argparse
import sys

from .engine import config
from .errors import UserError
from .tasks import TASKS
from .tasks.presets import PRESET_NAMES


def _add_train(sub) -> None:
    from .training.config import TrainConfig

    p = sub.add_parser("train", help="train a small pixel-space conditional diffusion model",
                       description="Train a class-conditional (UNet2DModel) or text-conditioned "
                                   "(UNet2DConditionModel + frozen text encoder) diffusion model, on the CPU or "
                                   "GPUs (torchrun --nproc-per-node N -m diffusion_classifier train ... for "
                                   "several). Re-running with the same --out resumes from its checkpoint.")
    p.add_argument("--data", required=True, help="'fashion-mnist' or an ImageFolder directory")
    p.add_argument("--split", default="train", choices=["train", "test"], help="split of a built-in dataset")
    p.add_argument("--subset", help="file of dataset indices to train on, one per line")
    p.add_argument("--labels", help="comma-separated class names replacing the dataset's, in class-index order")
    p.add_argument("--out", required=True, help="output directory (diffusers pipeline + checkpoint.pt)")
    config.add_arguments({"training": p.add_argument_group("training")}, TrainConfig, default_group="training")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_train(args) -> int:
    import json

    import torch

    from .data import load_dataset, read_subset
    from .tasks.labels import parse_label_list
    from .training.config import TrainConfig
    from .training.trainer import train

    training = config.from_arguments(args, TrainConfig)  # validate before loading data
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_dataset(args.data, args.split)
    if args.subset:
        dataset = dataset.subset(read_subset(args.subset))
    if args.labels:
        dataset.class_names = parse_label_list(args.labels, expected=len(dataset.class_names))
    summary = train(dataset, args.out, training, progress=not args.quiet)
    if summary is not None:  # rank 0 reports for everyone
        summary.pop("config")
        print(json.dumps(summary))
    return 0


def _add_learn_coarse(sub) -> None:
    p = sub.add_parser("learn-coarse", help="learn coarse classes for a trained class-conditional model",
                       description="Add coarse classes (groups of the model's classes, for cascade levels) to a "
                                   "class-conditional UNet model: one new class-embedding row each, fitted by the "
                                   "denoising loss on images of its members with the network frozen, so the "
                                   "model's own classes score exactly as before. Writes the extended model and "
                                   "its families (coarse_families.json) to --out.")
    p.add_argument("--model", required=True, help="a class-conditional UNet pipeline (train --conditioning class)")
    p.add_argument("--families", required=True, metavar="FILE",
                   help="JSON file of families: {coarse label: [class names]} (or a list of them); new labels only")
    p.add_argument("--data", required=True, help="'fashion-mnist' or an ImageFolder directory named by the classes")
    p.add_argument("--split", default="train", choices=["train", "test"], help="split of a built-in dataset")
    p.add_argument("--layout", default="single", choices=["single", "triples"],
                   help="triples: the data are items, drawn into three-item composites as a triples model trained")
    p.add_argument("--out", required=True, help="output directory (the extended model)")
    p.add_argument("--minutes", type=float, default=10.0, help="training time (default 10)")
    p.add_argument("--max-steps", type=_at_least_one, default=None, help="also stop after this many steps")
    p.add_argument("--batch-size", type=_at_least_one, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate of the new rows (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batches, coarse labels and noise")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def cmd_learn_coarse(args) -> int:
    import json

    from .data import load_dataset
    from .training.coarse import learn_coarse_classes

    if args.minutes <= 0 or args.lr <= 0:
        raise UserError("--minutes and --lr must be positive")
    families = _families(args.families)
    dataset = load_dataset(args.data, args.split)
    summary = learn_coarse_classes(args.model, families, dataset, args.out, args.layout, args.minutes,
                                   args.max_steps, args.batch_size, args.lr, args.seed, args.threads, args.device,
                                   progress=None if args.quiet else lambda line: print(line, flush=True))
    print(json.dumps(summary))
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_help() -> str:
    from .adapters.loading import BUILTIN_MODELS

    return (f"built-in name ({', '.join(BUILTIN_MODELS)}), a local diffusers pipeline directory, or a Hugging Face "
            "hub id")


def _add_model_options(p, labels: bool = True, model_required: bool = True) -> None:
    """labels=False: texts instead of classes (match), so no label, preset or probability options."""
    g = p.add_argument_group("model and labels" if labels else "model")
    g.add_argument("--model", required=model_required, help=_model_help())
    if labels:
        _add_label_options(g)
    _add_scoring_options(p, labels)


def _add_label_options(g) -> None:
    g.add_argument("--labels", help="comma-separated class names (default: the model's or the dataset's); for evaluate "
                   "one per class of the data in class-index order, or any list that names every class of the data "
                   "(more candidates than the data holds classes: matched by name)")
    g.add_argument("--labels-file", help="file with one class name per line")
    g.add_argument("--template", action="append", dest="templates",
                   help="prompt template with '{}' for the class name; repeat for several (text models)")
    g.add_argument("--templates-file", help="file with one template per line (text models)")


def _add_scoring_options(p, classes: bool = True) -> None:
    """classes=False (match): candidates are texts, so no preset, class tree or probability options."""
    what = "class" if classes else "text"
    whats = "classes" if classes else "texts"
    g = p.add_argument_group("scoring")
    groups = {"scoring": g}
    g.add_argument("--strategy", choices=["exhaustive", "staged", "elimination", "cascade"], default=None,
                   help=f"exhaustive: every {what} at --timesteps; staged: the paper's adaptive schedule; "
                        f"elimination: drop {whats} once paired statistics rule them out; cascade: the fitted "
                        f"stages of --cascade (many {whats})")
    g.add_argument("--timesteps", type=int, default=None,
                   help=f"timesteps per {what} (exhaustive; default 25; wins over a preset's schedule)")
    g.add_argument("--n-samples", type=int, nargs="+", help="timesteps per stage (staged), e.g. 50 500")
    g.add_argument("--to-keep", type=int, nargs="+", help=f"{whats} kept after each stage (staged), e.g. 5 1")
    if classes:
        g.add_argument("--preset", help="a dataset preset (" + ", ".join(PRESET_NAMES) + "): its class names and "
                       "prompts unless --labels / --template are given, and its staged schedule and loss unless "
                       "--strategy, --timesteps, --n-samples or --to-keep are")
    g.add_argument("--error-rate", type=float, default=None,
                   help=f"elimination: chance of dropping the best {what}, per image (default 0.05)")
    g.add_argument("--max-nfe", type=int, default=None, help="elimination: network evaluations per image at most")
    g.add_argument("--max-timesteps", type=int, default=None,
                   help="elimination: size of the even timestep grid it draws from (default 100, or the first "
                   "look's grid)")
    g.add_argument("--shortlist", type=int, default=None,
                   help=f"elimination: keep only this many {whats} after the first round (plain top-k)")
    g.add_argument("--first-look", metavar="FILE_OR_RUN",
                   help=f"elimination with many {whats}: first_look.json from `calibrate --first-look` (or the run "
                   f"directory holding it): every {what} at its few fitted timesteps first, then only those within "
                   "its fitted gap of the best go on (its miss rate adds to --error-rate)")
    g.add_argument("--cascade", metavar="FILE_OR_RUN",
                   help=f"cascade: cascade.json from `calibrate --cascade` (or the run directory holding it): "
                   f"stages that keep the {whats} within a fitted gap of the best, then the rest of the grid for "
                   "those left; drops exhaustive scoring's winner with at most its fitted miss rate")
    if classes:
        g.add_argument("--class-tree", help="elimination: JSON file grouping the class names (nested), or 'preset' "
                       "for the --preset's own tree (imagenet: its WordNet hierarchy); after round r only the "
                       "--keep-groups best groups at depth r go on")
        g.add_argument("--keep-groups", type=int, default=None,
                       help="elimination with --class-tree: groups kept per level (default 2)")
    if classes:
        g.add_argument("--temperature", type=float, default=None,
                       help="softmax temperature of probabilities (default: the model's stored one, else 1.0)")
        g.add_argument("--calibration", help="calibration.json (or a run directory holding one) from `calibrate`")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--resolution", type=int, default=None, metavar="PIXELS",
                   help="latent models whose networks take any size (SD 1.x/2.x, SDXL, SD3, Flux): score at this "
                   "image side instead of the native one (cost grows with its square; Flux's shift follows it)")
    g.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on the CPU), float32, float16 "
                   "or bfloat16")
    _add_fine_tune_options(g)
    groups["robustness"] = p.add_argument_group("robustness (pixel-space models)")
    config.add_arguments(groups, config.ScoringConfig)  # --loss, --aggregate, --seed, --batch-size, ...


def _add_fine_tune_options(g) -> None:
    from .adapters.hub import VARIANTS_HELP

    g.add_argument("--variant", default="auto", help=f"which weight files of the model to load: {VARIANTS_HELP}")
    g.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID",
                   help="LoRA weights (a .safetensors file, a directory or a hub id) fused into the model before "
                   "scoring (SD 1.x/2.x, SDXL, SD3, Flux); repeat for several")
    g.add_argument("--lora-scale", type=float, action="append", default=[], metavar="SCALE",
                   help="strength of each --lora, in order (default 1.0 each)")
    g.add_argument("--text-encoders", choices=["auto", "gpu", "cpu"], default="auto",
                   help="where text encoders live on a GPU: auto (the CPU once candidates are embedded; the GPU while "
                   "they embed, where they fit), gpu, or cpu; results differ by float rounding at most")
    g.add_argument("--config", dest="base_config", metavar="DIR_OR_ID",
                   help="with a single-file checkpoint as --model (.safetensors/.ckpt): its base pipeline, a "
                   "diffusers directory or hub id whose configs and other components it is loaded with")


def _load_options(args) -> dict:
    """The model-loading flags as load_denoiser / EvaluationRun take them."""
    return {"variant": args.variant, "lora": tuple(args.lora), "lora_scale": tuple(args.lora_scale),
            "base_config": args.base_config, "text_encoders": args.text_encoders}


def _cascade(path: str):
    from pathlib import Path

    from .engine.strategies import Cascade
    from .tasks.calibration import CASCADE_FILE

    return Cascade.load(Path(path) / CASCADE_FILE if Path(path).is_dir() else path)


def _first_look(path: str):
    from pathlib import Path

    from .engine.shortlists import FirstLook
    from .tasks.calibration import FIRST_LOOK_FILE

    return FirstLook.load(Path(path) / FIRST_LOOK_FILE if Path(path).is_dir() else path)


ELIMINATION_OPTIONS = {"error_rate": "--error-rate", "max_nfe": "--max-nfe", "max_timesteps": "--max-timesteps",
                       "shortlist": "--shortlist", "class_tree": "--class-tree", "keep_groups": "--keep-groups",
                       "first_look": "--first-look"}
STAGED_OPTIONS = {"n_samples": "--n-samples", "to_keep": "--to-keep"}
CASCADE_OPTIONS = {"cascade": "--cascade"}


def _strategy(args):
    """The strategy the flags ask for; None when none is asked for (the preset's, else exhaustive 25).

    One rule: an option the chosen strategy does not use is an error naming the strategy that uses it. Without
    --strategy, --n-samples/--to-keep choose staged and --timesteps exhaustive (as a preset's schedule would
    be replaced); elimination is only ever chosen by name."""
    from .engine.strategies import Elimination, Exhaustive, Staged

    def given(options: dict) -> list[str]:
        return [flag for name, flag in options.items() if getattr(args, name, None) not in (None, [])]

    chosen = args.strategy or ("staged" if given(STAGED_OPTIONS) else "exhaustive" if args.timesteps is not None
                               else None)
    timesteps = ["--timesteps"] if args.timesteps is not None else []
    foreign = {"elimination": given(STAGED_OPTIONS) + timesteps + given(CASCADE_OPTIONS),
               "staged": given(ELIMINATION_OPTIONS) + timesteps + given(CASCADE_OPTIONS),
               "exhaustive": given(ELIMINATION_OPTIONS) + given(STAGED_OPTIONS) + given(CASCADE_OPTIONS),
               "cascade": given(ELIMINATION_OPTIONS) + given(STAGED_OPTIONS) + timesteps,
               None: given(ELIMINATION_OPTIONS) + given(CASCADE_OPTIONS)}[chosen]
    if foreign:
        users = {"--timesteps": "exhaustive", **{f: "staged" for f in STAGED_OPTIONS.values()},
                 **{f: "elimination" for f in ELIMINATION_OPTIONS.values()},
                 **{f: "cascade" for f in CASCADE_OPTIONS.values()}}
        by = ", ".join(f"{flag} ({users[flag]})" for flag in foreign)
        now = f"--strategy {chosen}" if args.strategy else (
            "the default strategy (a preset's schedule, else exhaustive)" if chosen is None
            else f"the {chosen} strategy its options choose")
        raise UserError(f"{now} does not use {by}: add --strategy {users[foreign[0]]}, or leave them out")
    if chosen == "elimination":
        if getattr(args, "keep_groups", None) is not None and not getattr(args, "class_tree", None):
            raise UserError("--keep-groups is used with --class-tree only")
        tree = _class_tree(args) if getattr(args, "class_tree", None) else None
        first_look = _first_look(args.first_look) if args.first_look else None
        max_timesteps = args.max_timesteps if args.max_timesteps is not None else (
            first_look.grid if first_look else 100)
        return Elimination(0.05 if args.error_rate is None else args.error_rate, args.max_nfe, max_timesteps,
                           shortlist=args.shortlist, class_tree=tree,
                           keep_groups=getattr(args, "keep_groups", None) or 2, first_look=first_look)
    if chosen == "cascade":
        if not args.cascade:
            raise UserError("--strategy cascade needs --cascade FILE_OR_RUN (calibrate --cascade fits one)")
        return _cascade(args.cascade)
    if chosen == "staged":
        if not args.n_samples or not args.to_keep:
            raise UserError("the staged strategy needs both --n-samples and --to-keep")
        return Staged(args.n_samples, args.to_keep)
    if chosen == "exhaustive":
        return Exhaustive(25 if args.timesteps is None else args.timesteps)
    return None


def _class_tree(args):
    if args.class_tree != "preset":
        return _read_json(args.class_tree, "class tree")
    from .tasks.presets import preset

    tree = preset(args.preset).class_tree if getattr(args, "preset", None) else None
    if tree is None:
        raise UserError("--class-tree preset takes the tree of a --preset that has one (imagenet)")
    return tree


def _read_json(path: str, what: str):
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read the {what} {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"the {what} {path} is not valid JSON: {exc}") from None


def _labels(args) -> list[str] | None:
    from .tasks.labels import parse_label_list, read_labels_file

    if args.labels is not None and args.labels_file is not None:
        raise UserError("give --labels or --labels-file, not both")
    if args.labels is not None:  # an explicitly empty list is a mistake, not "the model's names"
        return parse_label_list(args.labels)
    if args.labels_file is not None:
        return read_labels_file(args.labels_file)
    return None


def _templates(args) -> list[str] | None:
    from .tasks.labels import read_lines, validate_templates

    templates = list(args.templates or []) + (read_lines(args.templates_file, "templates")
                                              if args.templates_file else [])
    return validate_templates(templates) if templates else None


def _scoring_fields(args) -> dict:
    """The scoring config's fields from the flags; strategy None (and loss None) leave them to the preset."""
    fields = config.arguments_of(args, config.ScoringConfig)
    return {**fields, "strategy": _strategy(args)}


def _model(args):
    from .adapters.loading import Placement

    return Placement(args.device, args.dtype, args.resolution).load(args.model, **_load_options(args))


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify image files",
                       description="Rank candidate labels for each image by the model's denoising error.")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_options(p)
    p.add_argument("--top-k", type=_at_least_one, default=5, help="labels shown per image")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")


def cmd_classify(args) -> int:
    import json

    from .data import load_image
    from .tasks.calibration import read_calibration
    from .tasks.classification import check_candidates, make_classifier
    from .tasks.presets import scoring_config

    images = [load_image(path) for path in args.images]  # fail fast, naming the bad file
    labels, templates = _labels(args), _templates(args)
    scoring = scoring_config(args.preset, **_scoring_fields(args))  # validate cheap options before loading
    check_candidates(args.model, labels, templates)
    if args.calibration:
        read_calibration(args.calibration)
    classifier = make_classifier(_model(args), scoring, labels, templates, args.preset, args.temperature,
                                 args.calibration)
    results = classifier.classify(images, names=args.images)
    probabilities = classifier.probabilities(results)
    source = classifier.probability_source
    if not args.json:
        print(f"# mean error: denoising error at shared (t, eps) pairs, lower is better; p: softmax at temperature "
              f"{classifier.temperature:.3g} ({source})")
    for path, result, probs in zip(args.images, results, probabilities):
        by_label = dict(zip(classifier.classes_, probs.tolist()))
        row = result.to_dict(args.top_k)
        row["probabilities"] = source
        for entry in row["ranking"]:
            entry["probability"] = by_label[entry["label"]]
        if args.json:
            print(json.dumps(row))
            continue
        tie = f"   TIE with {', '.join(result.tied_with)}: no decision" if result.tied_with else ""
        print(f"{path}: {result.prediction}   ({result.nfe} network evaluations, {result.seconds:.2f} s){tie}")
        _print_entries(row["ranking"], "label", {e["label"]: f"{e['probability']:.3f}" for e in row["ranking"]})
    return 0


def _add_match(sub) -> None:
    p = sub.add_parser("match", help="rank captions for images (or images for captions)",
                       description="Score every image against every text by the model's denoising error at "
                                   "shared (t, eps) pairs. --by image ranks the texts of each image (raw "
                                   "scores by default); --by text ranks the images of each text (scores "
                                   "normalised by the empty prompt's error by default).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_options(p, labels=False)
    g = p.add_argument_group("texts")
    g.add_argument("--text", action="append", dest="texts", default=[], help="a caption; repeat for several")
    g.add_argument("--texts-file", help="file with one caption per line")
    g.add_argument("--normalize", choices=["none", "unconditional"], default=None,
                   help="subtract the empty prompt's error at the same pairs (default: unconditional for "
                        "--by text, none for --by image)")
    g.add_argument("--by", choices=["image", "text"], default="image",
                   help="rank texts per image (default) or images per text")
    p.add_argument("--top-k", type=_at_least_one, default=5, help="entries shown per image (or text)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image (or text)")


def _texts(args) -> list[str]:
    from .tasks.labels import read_lines

    texts = list(args.texts) + (read_lines(args.texts_file, "texts") if args.texts_file else [])
    if not texts:
        raise UserError("give at least one text with --text or --texts-file")
    return texts


def cmd_match(args) -> int:
    import json

    from .data import load_image
    from .tasks.matching.matcher import DEFAULT_NORMALIZE, ImageTextMatcher
    from .tasks.presets import scoring_config

    images = [load_image(path) for path in args.images]
    texts = _texts(args)
    normalize = args.normalize or DEFAULT_NORMALIZE[args.by]
    scoring = scoring_config(None, **_scoring_fields(args))
    matcher = ImageTextMatcher(_model(args), config=scoring, with_null=normalize == "unconditional")
    matching = matcher.match(images, texts, names=args.images)
    rows = matching.rankings(args.by, normalize)
    if not args.json:
        print(f"# score: mean denoising error{' minus the empty prompt' + chr(39) + 's' if normalize != 'none' else ''}"
              " at shared (t, eps) pairs; lower is better")
    key = "text" if args.by == "image" else "image"
    for row in rows:
        row["ranking"] = row["ranking"][:args.top_k]
        if args.json:
            print(json.dumps(row))
            continue
        head = row.get("image") or repr(row["text"])
        cost = f"   ({row['nfe']} network evaluations, {row['seconds']:.2f} s)" if args.by == "image" else ""
        tie = "   TIE: no decision" if row["ranking"][0]["tie"] else ""
        print(f"{head}: {row['ranking'][0][key]!r}{cost}{tie}")
        _print_entries(row["ranking"], key)
    return 0


def _print_entries(entries: list[dict], key: str, probabilities: dict | None = None) -> None:
    """Ranked entries as a table; the timesteps each score rests on are shown where they differ."""
    differ = len({e["timesteps"] for e in entries}) > 1
    width = min(50, max(len(str(e[key])) for e in entries))
    for rank, e in enumerate(entries, 1):
        score = "   n/a" if e["score"] is None else f"{e['score']:.5f}"
        p = f"   p {probabilities[e[key]]}" if probabilities else ""
        rests = f"   over {e['timesteps']} timesteps" if differ else ""
        print(f"  {rank:>2}. {str(e[key]):<{width}}   mean error {score}{p}{rests}{'   (tie)' if e['tie'] else ''}")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="measure accuracy on a labelled dataset",
                       description="Classify a labelled dataset, storing per-image results (with full error "
                                   "matrices) in RUN_DIR/results.sqlite. Re-running on the same --out resumes.")
    p.add_argument("--run-file", metavar="FILE",
                   help="start or resume the run a run.json describes (every evaluate writes RUN_DIR/run.json); "
                        "it holds every setting, so no other option but --quiet and --json goes with it")
    p.add_argument("--task", choices=list(TASKS), default="classification",
                   help="classification (labelled images); winoground: a Winoground-layout manifest or saved "
                        "Hugging Face dataset (text, image and group scores); pairs: a true/false-caption "
                        "manifest (accuracy)")
    p.add_argument("--data",
                   help="'fashion-mnist', an ImageFolder directory (ROOT/CLASS/IMAGE), a manifest, or a saved "
                        "Hugging Face dataset")
    p.add_argument("--normalize", choices=["none", "unconditional"], default=None,
                   help="winoground: how the image score is normalised (default unconditional)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="split of a built-in dataset")
    p.add_argument("--subset", help="file of dataset indices (sorted order), one per line")
    p.add_argument("--limit", type=int, help="use only the first N images (after --subset)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (created, or resumed)")
    _add_model_options(p, model_required=False)
    p.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="take over the results of an earlier run with the same settings for the images it "
                        "shares with this one (e.g. a smaller subset); repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON line of metrics")
    p.set_defaults(evaluate_parser=p)


def cmd_evaluate(args) -> int:
    import json
    import time

    from .runs import EvaluationRun, run_evaluation
    from .tasks import get_task

    if args.run_file:
        parser = args.evaluate_parser
        given = [a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest not in (
            "run_file", "quiet", "json", "help", "verbose") and getattr(args, a.dest, None) != a.default]
        if given:
            raise UserError(f"--run-file holds every setting of the run; leave out {', '.join(given)}")
        run = EvaluationRun.load(args.run_file)
    else:
        missing = [flag for flag in ("--model", "--data", "--out") if getattr(args, flag[2:]) is None]
        if missing:
            raise UserError(f"evaluate needs {', '.join(missing)} (or --run-file FILE)")
        run = _evaluation_run(args)
    started = time.perf_counter()
    metrics = run_evaluation(run, progress=not args.quiet)
    elapsed = time.perf_counter() - started
    if metrics is None:  # not rank 0: rank 0 reports for everyone
        return 0
    for line in get_task(run.task).summary(metrics, elapsed):
        print(line)
    if args.json:
        print(json.dumps(metrics))
    return 0


def _evaluation_run(args):
    from .data import read_subset
    from .runs import EvaluationRun

    return EvaluationRun(model=args.model, data=args.data, out=args.out, task=args.task, split=args.split,
                         subset=read_subset(args.subset) if args.subset else None, limit=args.limit,
                         labels=_labels(args), templates=_templates(args), preset=args.preset,
                         scoring=_scoring_fields(args), device=args.device, dtype=args.dtype,
                         resolution=args.resolution, temperature=args.temperature, calibration=args.calibration,
                         normalize=args.normalize, reuse=tuple(args.reuse), **_load_options(args))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="metrics and plots of a stored evaluate run, without the model",
                       description="Recompute metrics from RUN_DIR/results.sqlite (optionally re-scoring with "
                                   "another prompt aggregation or a timestep range) and write RUN_DIR/report/ "
                                   "(report.json, confusion.png, accuracy_vs_timesteps.png, error_by_timestep.png).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by evaluate")
    p.add_argument("--aggregate", choices=["min", "mean"], help="re-score with this prompt aggregation")
    p.add_argument("--t-min", type=int, default=0, help="re-score with stored timesteps >= this only")
    p.add_argument("--t-max", type=int, default=None, help="re-score with stored timesteps <= this only")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_report(args) -> int:
    import json

    from .tasks.report import build_report, report_lines

    report = build_report(args.run_dir, args.aggregate, args.t_min, args.t_max, plots=not args.no_plots)
    if args.json:
        print(json.dumps(report))
        return 0
    for line in report_lines(report):
        print(line)
    print(f"  written to {args.run_dir}/report/")
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a web page to try a model (needs the demo extra: gradio)",
                       description="Serve a page where an image is dropped or picked, labels typed, and the "
                                   "ranked labels, the cost and per-timestep errors shown. Loopback only unless "
                                   "--host is given.")
    p.add_argument("--model", default="fashion-mnist-text", help=_model_help())
    p.add_argument("--port", type=int, default=7860, help="TCP port of the page (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--timesteps", type=int, default=10, help="initial timesteps per label")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")


def cmd_serve(args) -> int:
    from .demo import serve
    from .runtime import parse_device

    if not 0 < args.port < 65536:
        raise UserError("--port must be between 1 and 65535")
    serve(args.model, host=args.host, port=args.port, device=parse_device(args.device), timesteps=args.timesteps)
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit the probability temperature on a labelled evaluate run",
                       description="Fit the softmax temperature on a seeded part of a stored labelled run and "
                                   "report NLL and expected calibration error before/after on the rest. Writes "
                                   "RUN_DIR/calibration.json, which classify/evaluate take with --calibration.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by evaluate")
    p.add_argument("--fit-fraction", type=float, default=0.5, help="share of images used to fit (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split")
    p.add_argument("--per-timestep", action="store_true",
                   help="also fit one weight per timestep (exhaustive runs; classify must use the same timesteps)")
    p.add_argument("--first-look", type=int, metavar="K", default=None,
                   help="instead: fit a first look of K timesteps for --strategy elimination --first-look on an "
                   "exhaustive run (many candidates); writes RUN_DIR/first_look.json")
    p.add_argument("--look-run", metavar="LOW_RUN", default=None,
                   help="with --first-look (latent models): an exhaustive run of the same images at a lower "
                   "--resolution; the look is fitted on it against RUN_DIR's winners and scores at that resolution")
    p.add_argument("--cascade", action="store_true",
                   help="instead: fit a cascade for --strategy cascade on an exhaustive run (many candidates): its "
                   "stages' timesteps and gaps; writes RUN_DIR/cascade.json")
    p.add_argument("--first", type=int, nargs="+", default=None, metavar="K",
                   help="with --cascade: timesteps of its first stage (default 1, with --families 1 2 3); several: "
                   "the one whose cost on the held-out images is lowest")
    p.add_argument("--families", metavar="FILE", nargs="+",
                   help="with --cascade: coarse levels before the fine stages, from JSON files of families "
                   "({coarse label: [class labels]}, or a list of them; several files: their families in order, "
                   "e.g. learn-coarse's coarse_families.json after the model's own); RUN_DIR must have scored each "
                   "coarse label as a candidate beside the classes (evaluate --labels naming both)")
    p.add_argument("--levels", nargs="+", metavar="F:K", default=None,
                   help="with --families: the coarse levels in order, each family F (numbered from 0) with K "
                   "timesteps, or options K/K/... chosen on held-out images; a family given again adds timesteps "
                   "for its groups still in (default: each family twice, F:2 F:4)")
    p.add_argument("--miss-rate", type=float, default=None,
                   help="with --first-look or --cascade: chance of leaving out the exhaustive winner (default 0.02 "
                   "for a first look, 0.05 for a cascade)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_calibrate(args) -> int:
    import json

    from .tasks.calibration import calibrate_run, cascade_of_run, first_look_of_run

    if args.first_look is not None and args.cascade:
        raise UserError("fit a first look or a cascade, not both")
    if args.miss_rate is not None and args.first_look is None and not args.cascade:
        raise UserError("--miss-rate goes with --first-look or --cascade")
    if args.first is not None and not args.cascade:
        raise UserError("--first goes with --cascade")
    if args.look_run is not None and args.first_look is None:
        raise UserError("--look-run goes with --first-look")
    if args.families is not None and not args.cascade:
        raise UserError("--families goes with --cascade")
    if args.levels is not None and args.families is None:
        raise UserError("--levels goes with --families")
    if args.cascade:
        families = [family for path in args.families for family in _families(path)] if args.families else None
        levels = [_level(spec) for spec in args.levels] if args.levels else None
        cascade = cascade_of_run(args.run_dir, args.first, 0.05 if args.miss_rate is None else args.miss_rate,
                                 families, levels)
        if args.json:
            print(json.dumps(cascade.describe()))
        else:
            from pathlib import Path

            def level(family: dict) -> str:
                return f"{next(iter(family))!r} and {len(family) - 1} more coarse: "

            stages = "; ".join(("" if stage["family"] is None else level(cascade.families[stage["family"]]))
                               + f"{len(stage['timesteps'])} timesteps, gap {stage['max_gap']:.3g}"
                               for stage in cascade.stages)
            print(f"cascade of {len(cascade.stages)} stages ({stages}), then the rest of the {cascade.grid}-point "
                  f"grid; {cascade.held_out_nfe:.0f} NFE per image on the held-out images that chose its timesteps "
                  f"(new images cost more); misses the exhaustive winner on at most {cascade.miss_rate:g} of images "
                  f"like these (fitted on {cascade.fitted_on}); written to {Path(args.run_dir) / 'cascade.json'}")
        return 0
    if args.first_look is not None:
        first = first_look_of_run(args.run_dir, args.first_look, 0.02 if args.miss_rate is None else args.miss_rate,
                                  args.look_run)
        if args.json:
            print(json.dumps(first.to_dict()))
        else:
            from pathlib import Path

            at = f" at {first.resolution} px" if first.resolution else ""
            print(f"first look{at} at timesteps {list(first.timesteps)}: keeps classes within {first.max_gap:.4g} "
                  f"(relative) of the best; mean shortlist {first.held_out_shortlist:.1f}; misses the exhaustive "
                  f"winner on at most {first.miss_rate:g} of images like these; written to "
                  f"{Path(args.run_dir) / 'first_look.json'}")
        return 0
    result = calibrate_run(args.run_dir, args.fit_fraction, args.seed, per_timestep=args.per_timestep)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"temperature {result['temperature']:.5g} (fitted on {result['fit_images']} images)")
    for when in ("before", "after", "after_per_timestep"):
        if when in result:
            print(f"  {when:<18} on {result['held_out_images']} held-out images: NLL {result[when]['nll']:.4f}  "
                  f"ECE {result[when]['ece']:.4f}")
    return 0


def _families(path: str) -> list[dict]:
    families = _read_json(path, "families")
    families = [families] if isinstance(families, dict) else families
    if not isinstance(families, list) or not families or not all(
            isinstance(family, dict) and family and all(
                isinstance(members, list) and members and all(isinstance(m, str) for m in members)
                for members in family.values()) for family in families):
        raise UserError(f"{path}: families are {{coarse label: [class labels]}} objects (one, or a list of them)")
    return families


def _level(spec: str) -> tuple[int, list[int]]:
    """'F:K' or 'F:K/K/...' (a family and its timesteps, or options) as (F, [K, ...])."""
    family, _, options = spec.partition(":")
    try:
        level = int(family), [int(k) for k in options.split("/")]
    except ValueError:
        level = None
    if level is None or level[0] < 0 or min(level[1]) < 1:
        raise UserError(f"--levels takes FAMILY:TIMESTEPS such as 0:2 or 1:2/4, not {spec!r}")
    return level


class _HelpFormatter(argparse.HelpFormatter):
    """Help lines wrapped between words only, so names such as fashion-mnist-class stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one line and a pointer to --help, not the whole usage text (exit 2 as argparse's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


VERBOSE_HELP = "show the warnings and log lines of diffusers, transformers and torch"


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="GPU memory a model needs to score, from its configs alone",
                       description="Build the model's networks from their config files on fake tensors (nothing is "
                                   "downloaded but configs and tokenizers; no memory is allocated), run one embedding, "
                                   "VAE encoding and scoring batch through them, and print weights per component and "
                                   "where each lives, activation memory per sample, the VAE's share, the peak at the "
                                   "chosen settings and the largest batch that fits --memory.")
    p.add_argument("--model", required=True, help=_model_help())
    p.add_argument("--resolution", type=int, default=None, metavar="PIXELS", help="image side (default: native)")
    p.add_argument("--batch-size", default="256", help="network evaluations per pass (default 256)")
    p.add_argument("--memory", default=None, help="a GPU's memory, e.g. 24GB: report the largest batch that fits")
    p.add_argument("--dtype", default="bfloat16", help="scoring dtype (default bfloat16, as on CUDA)")
    p.add_argument("--text-encoders", choices=["auto", "gpu", "cpu"], default="auto",
                   help="where text encoders live while scoring (as classify's option)")
    p.add_argument("--variant", default="auto", help="which weight files (as classify's option)")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")


def cmd_estimate(args) -> int:
    import json

    from .adapters.estimate import describe, estimate

    if not str(args.batch_size).isdigit() or int(args.batch_size) < 1:  # before any config is read
        raise UserError(f"--batch-size must be a whole number of at least 1, got {args.batch_size!r}")
    result = estimate(args.model, resolution=args.resolution, batch_size=int(args.batch_size), dtype=args.dtype,
                      memory=args.memory, text_encoders=args.text_encoders, variant=args.variant)
    print(json.dumps(result.to_dict()) if args.json else "\n".join(describe(result)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="diffusion-classifier",
                     description="Zero-shot image classification with conditional diffusion models.")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_classify(sub)
    _add_match(sub)
    _add_evaluate(sub)
    _add_report(sub)
    _add_calibrate(sub)
    _add_train(sub)
    _add_learn_coarse(sub)
    _add_serve(sub)
    _add_estimate(sub)
    for command in sub.choices.values():  # --verbose also after the command; SUPPRESS keeps the top-level value
        command.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


COMMANDS = {"classify": cmd_classify, "match": cmd_match, "evaluate": cmd_evaluate, "report": cmd_report,
            "calibrate": cmd_calibrate, "train": cmd_train, "learn-coarse": cmd_learn_coarse, "serve": cmd_serve,
            "estimate": cmd_estimate}


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    # read when the libraries configure their loggers (on first use, after this): errors only
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")


def main(argv: list[str] | None = None) -> int:
    from .runtime import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    if not args.verbose:
        _quiet_libraries()
    tune_cpu_allocator()  # once per process, here and not inside library calls (see runtime.py)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"diffusion-classifier: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffusion-classifier: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped (`... --json | head -1`): nothing left to say to it
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":
    sys.exit(main())
