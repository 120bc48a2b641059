"""#24 (c) on a GPU: the generative-only pairs control trained far past the 6.5 epochs our CPUs gave it.
Does the denoising objective alone learn word order ("a bag to the left of a coat" against the same words
swapped), as the paper's compositional claim implies, or only with hard negatives?

The 88 MB text encoder cannot travel to the GPU machine (64 MiB for the checkout, wheels and data
together), so its token states travel instead. `pack`, run where the encoder is installed, writes the
states of every training caption (5,041) and of the held-out examples' captions: bfloat16, only the
attended tokens, byte-shuffled and xz-compressed (about 28 MiB in all). `run`, on the GPU machine, trains
and scores from them without the encoder. bfloat16 costs the GPU run nothing: under bf16 autocast the
states enter the network only through the cross-attention's key and value projections, which read them
rounded to bfloat16 anyway, and padding positions are masked out of attention (their values never count).

    python -m benchmarks.gpu_pairs pack --states .states                  # here: about 2 minutes
    python -m benchmarks.gpu_pairs run --states .states --out-dir $OUT    # the GPU machine (tools/gpu_run_pairs.sh)
    python -m benchmarks.gpu_pairs pack --tiny --states S && python -m benchmarks.gpu_pairs run --tiny \\
        --states S --out-dir O                                            # CPU smoke test (the tests run it)

`run` trains the stage-1 recipe of models/fashion-mnist-pairs (`train --layout pairs --conditioning text
--max-text-length 32`, no hard negatives) at --batch-size in bf16 for --minutes, scores --curve-examples
held-out examples at 10 timesteps after each of --curve-minutes (a learning curve of the text / image /
group scores; the 6.5-epoch CPU control was measured the same way: 35.0 / 4.0 / 4.0%), then --examples at
--grid timesteps as benchmarks/compositional.py scores the shipped model. Writes gpu_pairs.json and the
EMA pipeline (weights only) as pairs-control.tar into --out-dir. `run --resume-from CHECKPOINT` continues an
earlier lease's run (tools/gpu_run_pairs.sh brings its checkpoint back in parts, as files over 16 MiB do not
come back from the GPU machine), so leases add up.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_classifier.adapters.denoiser import ModelInfo
from diffusion_classifier.adapters.loading import ComponentLoader, is_component_spec, load_denoiser, read_index
from diffusion_classifier.adapters.text_unet import TextUNetDenoiser
from diffusion_classifier.data import fashion_mnist_arrays, load_dataset
from diffusion_classifier.errors import UserError
from diffusion_classifier.runtime import atomic_torch_save, atomic_write_bytes, atomic_write_text
from diffusion_classifier.training.config import CAPTION_STATES, TrainConfig
from diffusion_classifier.training.pairs import load_spec, winoground_examples
from diffusion_classifier.training.trainer import Trainer

from .common import RESULTS
from .compositional import manifest_for, score_diffusion
from .gpu_training import pack

TRAIN_PACK, EVAL_PACK, SPEC = "train-captions.npz", "eval-captions.npz", "pairs-spec.json"


# ----- packed token states --------------------------------------------------------------------

def write_pack(path: Path, captions: list[str], states: torch.Tensor, mask: torch.Tensor, **meta) -> None:
    """states [N, L, W] and a right-padded attention mask [N, L] -> the attended tokens' states in bfloat16,
    high bytes before low bytes (the high bytes, sign and exponent, compress well), xz-compressed."""
    lengths = mask.sum(1)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1]) < lengths[:, None]):
        raise ValueError("the attention mask is not a right-padded prefix")
    bits = states[mask.bool()].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
    payload = lzma.compress(bits[:, 1].tobytes() + bits[:, 0].tobytes(), preset=6)
    header = json.dumps({"captions": captions, "shape": list(states.shape), "mask_dtype": str(mask.dtype), **meta})
    with tempfile.TemporaryFile() as buffer:
        np.savez(buffer, header=np.array(header), lengths=lengths.numpy().astype(np.uint8),
                 payload=np.frombuffer(payload, dtype=np.uint8))
        buffer.seek(0)
        atomic_write_bytes(buffer.read(), path)


def read_pack(path: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(header, states [N, L, W] float32 with zeros at padding, mask [N, L]) of a `write_pack` file."""
    with np.load(path, allow_pickle=False) as stored:
        header, lengths, payload = json.loads(str(stored["header"])), stored["lengths"], stored["payload"]
    n, length, width = header["shape"]
    raw = np.frombuffer(lzma.decompress(payload.tobytes()), dtype=np.uint8)
    half = len(raw) // 2
    bits = np.stack([raw[half:], raw[:half]], axis=1).reshape(-1).view(np.int16).reshape(-1, width)
    mask = torch.arange(length) < torch.as_tensor(lengths.astype(np.int64))[:, None]
    states = torch.zeros(n, length, width)
    states[mask] = torch.from_numpy(bits.copy()).view(torch.bfloat16).float()
    return header, states, mask.to(getattr(torch, header["mask_dtype"].replace("torch.", "")))


class PackedStatesDenoiser(TextUNetDenoiser):
    """A text model whose prompts' token states were computed where its encoder is (`pack`): looked up."""

    def __init__(self, captions: list[str], states: torch.Tensor, mask: torch.Tensor, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows = {caption: k for k, caption in enumerate(captions)}
        self.states, self.mask = states, mask

    def embed_conditions(self, prompts, batch_size: int = 64):
        missing = [p for p in prompts if p not in self.rows]
        if missing:
            raise UserError(f"no packed token states for the caption {missing[0]!r}; pack again")
        index = torch.tensor([self.rows[p] for p in prompts])
        return {"encoder_hidden_states": self.states[index].to(self.device, self.dtype),
                "encoder_attention_mask": self.mask[index].to(self.device)}


def packed_denoiser(model_dir: Path, packed: tuple, device: torch.device, dtype: torch.dtype) -> TextUNetDenoiser:
    """An exported text model with the eval pack's states in place of its encoder."""
    header, states, mask = packed
    index = read_index(model_dir)
    specs = {k: v for k, v in index.items() if is_component_spec(k, v)}
    load = ComponentLoader(model_dir, specs)
    info = ModelInfo.from_index({k: v for k, v in index.items() if k not in specs and not k.startswith("_")})
    denoiser = PackedStatesDenoiser(header["captions"], states, mask, load("unet"), load("scheduler"), info=info)
    denoiser.source_dir = model_dir
    return denoiser.to(device=device, dtype=dtype)


# ----- the two steps ----------------------------------------------------------------------------

def train_config(args, spec_path: Path, minutes: float, device: torch.device) -> TrainConfig:
    # the built-in captions as "" (a resume compares the settings, and the staged path differs between leases)
    captions_file = "" if load_spec(spec_path) == load_spec() else str(spec_path)
    return TrainConfig(conditioning="text", layout="pairs", max_text_length=32, captions_file=captions_file,
                       batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       ema_decay=args.ema_decay, max_minutes=minutes, checkpoint_minutes=10**6,
                       device=str(device), precision=args.precision if device.type == "cuda" else "fp32",
                       compile=args.compile)


def train_set(tiny: bool):
    data = load_dataset("fashion-mnist", "train")
    return data.subset(range(2000)) if tiny else data


def eval_captions(args) -> list[str]:
    """The captions of the held-out examples (built as compositional.py builds them), and the empty one."""
    images, labels = fashion_mnist_arrays("test")
    captions = [""]  # the unconditional caption of normalised scores
    for n in (args.examples, args.curve_examples):
        for example in winoground_examples(images, labels, n, seed=0):
            captions += [example.caption_0, example.caption_1]
    return list(dict.fromkeys(captions))


def pack_states(args) -> None:
    """Here, with the encoder: the trainer's caption states of the training bank, and the held-out captions'
    states as the exported model embeds them when scoring."""
    args.states.mkdir(parents=True, exist_ok=True)
    spec = load_spec()
    if args.tiny:  # one template, names only: 111 captions instead of 5,041
        spec.update(train_synonyms=[[] for _ in spec["names"]], train_templates=spec["train_templates"][:1],
                    single_templates=spec["single_templates"][:1])
    atomic_write_text(json.dumps(spec, indent=2) + "\n", args.states / SPEC)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(train_set(args.tiny), work, train_config(args, args.states / SPEC, 1.0,
                                                                     torch.device("cpu")))
        stored = torch.load(Path(work) / CAPTION_STATES, weights_only=True)
        write_pack(args.states / TRAIN_PACK, trainer.bank.captions, stored["states"]["encoder_hidden_states"],
                   stored["states"]["encoder_attention_mask"], key=stored["key"], width=stored["width"])
        trainer.export()  # an untrained export: it embeds captions exactly as the trained one will
        captions = eval_captions(args)
        cond = load_denoiser(work).embed_conditions(captions)
        write_pack(args.states / EVAL_PACK, captions, cond["encoder_hidden_states"], cond["encoder_attention_mask"])
    for name in (TRAIN_PACK, EVAL_PACK):
        print(f"{args.states / name}: {(args.states / name).stat().st_size / 2**20:.1f} MiB", flush=True)


def winoground_summary(result: dict, timesteps: int) -> dict:
    """The normalised and raw rows of one timestep count, as text / image / group with standard errors."""
    out = {}
    for row in result["rows"]:
        if row["timesteps"] == timesteps:
            out[row["image_normalize"]] = {k: row[k] for k in row if k.endswith(("score", "stderr"))}
    return out


def run(args) -> None:
    started = time.perf_counter()
    deadline = started + args.budget_seconds
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in (SPEC, TRAIN_PACK, EVAL_PACK):  # before anything slow
        if not (args.states / name).is_file():
            raise UserError(f"{args.states / name} is missing: run `gpu_pairs.py pack` where the encoder is")
    out = Path(args.out_dir)
    model_dir = out / "work" / "pairs-control"
    model_dir.mkdir(parents=True, exist_ok=True)
    header, states, mask = read_pack(args.states / TRAIN_PACK)
    atomic_torch_save({"key": header["key"], "width": header["width"],
                       "states": {"encoder_hidden_states": states, "encoder_attention_mask": mask}},
                      model_dir / CAPTION_STATES)  # the trainer takes these instead of running the encoder
    del states, mask
    if args.resume_from:  # a checkpoint of an earlier lease (joined from its parts): this lease continues it
        shutil.copyfile(args.resume_from, model_dir / "checkpoint.pt")
    eval_pack = read_pack(args.states / EVAL_PACK)
    missing = set(eval_captions(args)) - set(eval_pack[0]["captions"])
    if missing:
        raise UserError(f"{args.states / EVAL_PACK} lacks {len(missing)} captions of --examples "
                        f"{args.examples} / --curve-examples {args.curve_examples}: pack with the same numbers")
    data = train_set(args.tiny)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny, "train_captions": len(header["captions"]),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                           if k not in ("out_dir", "command")}, "curve": []}

    def save() -> None:
        atomic_write_text(json.dumps(result, indent=2) + "\n", out / "gpu_pairs.json")

    def score(examples: int, grid: int, tag: str) -> dict:
        denoiser = packed_denoiser(model_dir, eval_pack, device, dtype)
        return score_diffusion(model_dir, manifest_for(examples), out / "work" / f"score-{tag}", grid,
                               args.score_batch, denoiser=denoiser)

    trained = 0.0
    for minutes in sorted(m for m in args.curve_minutes if m < args.minutes) + [args.minutes]:
        if time.perf_counter() + 60 * (minutes - trained) > deadline:
            result["stopped"] = f"the budget ends before {minutes} minutes of training"
            break
        trainer = Trainer(data, model_dir, train_config(args, args.states / SPEC, minutes - trained, device))
        trainer.resume()
        summary = trainer.run(progress=False)
        summary.pop("config")
        summary["images_per_second"] = summary["images_seen"] / max(summary["train_seconds"], 1e-9)
        trained, result["training"] = minutes, summary
        point = score(args.curve_examples, 10, f"{minutes:g}min")
        result["curve"].append({"minutes": minutes, "epochs": summary["epochs"], "examples": point["examples"],
                                "timesteps": 10, **winoground_summary(point, 10)})
        print(f"{minutes:g} min ({summary['epochs']:.1f} epochs, {summary['images_per_second']:.0f} images/s): "
              f"{json.dumps(result['curve'][-1]['unconditional'])}", flush=True)
        save()
    if "training" in result and time.perf_counter() < deadline:
        final = score(args.examples, args.grid, "final")
        result["final"] = {k: final[k] for k in ("examples", "seconds", "rows", "elimination")}
        print(f"final ({final['examples']} examples, {args.grid} timesteps): "
              f"{json.dumps(winoground_summary(final, args.grid)['unconditional'])}", flush=True)
    if "training" in result:
        pack(model_dir, out / "pairs-control.tar")
    for name, path in (("cpu_control", "compositional-generative-control.json"), ("shipped", "compositional.json")):
        if (RESULTS / path).is_file():  # the references this run is read against
            reference = json.loads((RESULTS / path).read_text()).get("diffusion", {})
            result.setdefault("references", {})[name] = {k: reference.get(k) for k in ("model", "examples", "rows")}
    result["seconds"] = round(time.perf_counter() - started, 1)
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["pack", "run"])
    parser.add_argument("--states", type=Path, default=Path(".states"), help="folder of the packed token states")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: seconds of training, 8 examples")
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget")
    parser.add_argument("--curve-minutes", type=float, nargs="*", default=[1.0, 2.0, 4.0])
    parser.add_argument("--curve-examples", type=int, default=100)
    parser.add_argument("--examples", type=int, default=400, help="held-out examples of the final score")
    parser.add_argument("--grid", type=int, default=25, help="timesteps of the final score")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--compile", action="store_true", help="train --compile")
    parser.add_argument("--resume-from", type=Path, help="checkpoint.pt of an earlier run to continue")
    parser.add_argument("--score-batch", type=int, default=4096)
    parser.add_argument("--budget-seconds", type=float, default=540)
    parser.add_argument("--out-dir", default="gpu-out")
    args = parser.parse_args()
    if args.tiny:
        args.minutes, args.curve_minutes, args.curve_examples, args.examples = 0.04, [0.02], 4, 8
        args.grid, args.batch_size, args.warmup_steps, args.score_batch = 4, 32, 5, 64
    try:
        pack_states(args) if args.command == "pack" else run(args)
    except UserError as exc:
        sys.exit(f"gpu_pairs.py: {exc}")


if __name__ == "__main__":
    main()
