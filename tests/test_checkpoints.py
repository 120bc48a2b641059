"""Checkpoints as users have them, without the hub: precision kept where the libraries keep it, non-finite
numbers as errors, LoRAs and single-file checkpoints, and the Python API's defaults."""

from __future__ import annotations

import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_classifier import DiffusionClassifier, ImageTextMatcher, load_denoiser
from diffusion_classifier.cli import build_parser, main
from diffusion_classifier.engine.strategies import Exhaustive
from diffusion_classifier.errors import UserError
from diffusion_classifier.runs import EvaluationRun, run_evaluation

from .conftest import image_folder, random_images
from .test_hub import make_sd_lora


def errors_of(denoiser, labels=("cat", "dog"), images=None) -> np.ndarray:
    clf = DiffusionClassifier(denoiser, labels=list(labels), strategy=Exhaustive(3))
    return np.stack([r.errors for r in clf.classify(images or random_images(2, size=16))])


# ----- precision ---------------------------------------------------------------------------------------------
def test_a_vae_that_asks_for_float32_encodes_in_float32_under_float16(models, tmp_path):
    fp16 = load_denoiser(models["sdxl"], device="cpu", dtype="float16")
    assert fp16.vae.config.force_upcast
    assert fp16.vae.dtype == torch.float32 and fp16.network.dtype == torch.float16
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = fp16.encode_images(pixels)
    assert latents.dtype == torch.float16
    fp32 = load_denoiser(models["sdxl"], device="cpu", dtype="float32")
    torch.testing.assert_close(latents.float(), fp32.encode_images(pixels), rtol=1e-3, atol=1e-3)
    assert load_denoiser(models["sdxl"], device="cpu", dtype="bfloat16").vae.dtype == torch.bfloat16  # no overflow
    shutil.copytree(models["sdxl"], tmp_path / "no_upcast")
    config = json.loads((tmp_path / "no_upcast" / "vae" / "config.json").read_text())
    (tmp_path / "no_upcast" / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    assert load_denoiser(tmp_path / "no_upcast", device="cpu", dtype="float16").vae.dtype == torch.float16


def test_t5_keeps_its_float32_layers_when_loaded_or_cast_to_float16(models):
    def dtypes(denoiser):
        t5 = denoiser.text_encoders[2]
        kept = {p.dtype for n, p in t5.named_parameters() if ".wo." in n}
        rest = {p.dtype for n, p in t5.named_parameters() if ".wo." not in n}
        return kept, rest

    assert dtypes(load_denoiser(models["sd3"], device="cpu", dtype="float16")) == ({torch.float32}, {torch.float16})
    cast = load_denoiser(models["sd3"], device="cpu", dtype="float32").to(dtype=torch.float16)
    assert dtypes(cast) == ({torch.float32}, {torch.float16})
    assert cast.network.dtype == torch.float16


def test_models_load_in_the_scoring_dtype(models):
    denoiser = load_denoiser(models["sd"], device="cpu", dtype="bfloat16")
    for module in (denoiser.network, denoiser.text_encoder, denoiser.vae):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_an_explicit_variant_the_model_lacks_is_said(models, capsys):
    denoiser = load_denoiser(models["sd"], device="cpu", variant="fp16", dtype="float32")
    assert denoiser.weights_variant is None
    assert "--variant fp16: " in capsys.readouterr().err


# ----- non-finite numbers ------------------------------------------------------------------------------------
def test_a_network_that_returns_nan_stops_with_the_image_named(models):
    denoiser = load_denoiser(models["pixel_class"], device="cpu")
    denoiser._network = lambda x_t, t, cond: torch.full_like(x_t, float("nan"))
    clf = DiffusionClassifier(denoiser, strategy=Exhaustive(2))
    with pytest.raises(UserError, match=r"NaN or inf in the denoising errors of image first.png: nothing was ranked"):
        clf.classify(random_images(2, size=8, mode="L"), names=["first.png", "second.png"])


def test_float16_overflow_suggests_another_dtype(models):
    denoiser = load_denoiser(models["pixel_class"], device="cpu")
    denoiser.to(dtype=torch.float16)
    denoiser._network = lambda x_t, t, cond: torch.full_like(x_t, float("inf"))
    with pytest.raises(UserError, match="try --dtype bfloat16 or float32"):
        DiffusionClassifier(denoiser, strategy=Exhaustive(2)).classify(random_images(1, size=8, mode="L"))


def test_nan_latents_stop_before_scoring(models):
    denoiser = load_denoiser(models["sd"], device="cpu")
    with torch.no_grad():
        denoiser.vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"latents \(the VAE's encoding\) of image #0"):
        errors_of(denoiser)


def test_the_cli_reports_nan_in_one_line(models, tmp_path, capsys):
    shutil.copytree(models["pixel_class"], tmp_path / "broken")
    weights = tmp_path / "broken" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("nan"))
    save_file(state, weights)
    image = tmp_path / "shoe.png"
    random_images(1, size=8, mode="L")[0].save(image)
    code = main(["classify", str(image), "--model", str(tmp_path / "broken"), "--timesteps", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"diffusion-classifier: error: NaN or inf in the denoising errors of image "
                                        f"{image}: nothing was ranked (scoring in float32; the model's weights or "
                                        "the image may hold NaN or inf)"]


# ----- LoRA ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_lora(models, tmp_path_factory):
    return make_sd_lora(models["sd"], tmp_path_factory.mktemp("lora"))


def test_a_lora_changes_the_errors_and_a_zero_scale_lora_does_not(models, sd_lora):
    base = errors_of(load_denoiser(models["sd"], device="cpu"))
    tuned = load_denoiser(models["sd"], device="cpu", lora=[sd_lora])
    assert tuned.fine_tunes[0]["lora"] == str(sd_lora) and tuned.fine_tunes[0]["scale"] == 1.0
    assert not np.allclose(errors_of(tuned), base, rtol=1e-4)
    np.testing.assert_array_equal(errors_of(load_denoiser(models["sd"], device="cpu", lora=[sd_lora],
                                                          lora_scale=[0.0])), base)


def test_lora_scales_add_up(models, sd_lora):
    """Two LoRAs fused at 0.5 each are one at 1.0 (the deltas are linear in the scale)."""
    once = errors_of(load_denoiser(models["sd"], device="cpu", lora=[sd_lora]))
    halves = errors_of(load_denoiser(models["sd"], device="cpu", lora=[sd_lora, sd_lora.parent],
                                     lora_scale=[0.5, 0.5]))
    np.testing.assert_allclose(halves, once, rtol=1e-4, atol=1e-6)


def test_lora_mistakes_are_one_line_errors(models, sd_lora, tmp_path):
    with pytest.raises(UserError, match="one scale per --lora"):
        load_denoiser(models["sd"], device="cpu", lora=[sd_lora], lora_scale=[0.5, 0.5])
    with pytest.raises(UserError, match="one scale per --lora"):  # a scale without a LoRA is not ignored
        load_denoiser(models["sd"], device="cpu", lora_scale=[0.5])
    with pytest.raises(UserError, match="no such file or directory"):
        load_denoiser(models["sd"], device="cpu", lora=[tmp_path / "missing.safetensors"])
    with pytest.raises(UserError, match="is not a diffusers pipeline, so diffusers cannot load LoRA"):
        load_denoiser(models["pixel_text"], device="cpu", lora=[sd_lora])
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(sd_lora, tmp_path / "two" / name)
    with pytest.raises(UserError, match="several .safetensors files"):
        load_denoiser(models["sd"], device="cpu", lora=[tmp_path / "two"])


def test_a_lora_is_part_of_a_runs_identity(models, sd_lora, tmp_path):
    data = image_folder(tmp_path / "data", ["cat", "dog"], 1, size=16, mode="RGB")
    run = dict(model=str(models["sd"]), data=str(data), out=str(tmp_path / "run"), device="cpu",
               scoring={"strategy": Exhaustive(2)}, lora=(str(sd_lora),))
    assert run_evaluation(EvaluationRun(**run), progress=False)["complete"]
    with pytest.raises(UserError, match="differs in: .*fine_tunes"):
        run_evaluation(EvaluationRun(**{**run, "lora": ()}), progress=False)


# ----- single-file checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("family, key", [("sd", "unet"), ("flux_schnell", "transformer")])
def test_a_single_file_network_round_trips(models, tmp_path, family, key):
    base = load_denoiser(models[family], device="cpu")
    file = tmp_path / "fine-tune.safetensors"
    save_file({k: v.contiguous() for k, v in base.network.state_dict().items()}, file)
    loaded = load_denoiser(file, device="cpu", base_config=models[family])
    assert loaded.fine_tunes[0]["single_file"] == str(file)
    assert file in loaded.weight_files and not any(p.parent.name == key for p in loaded.weight_files)
    images = random_images(1, size=16)
    np.testing.assert_array_equal(errors_of(loaded, images=images), errors_of(base, images=images))
    changed = {k: v * 1.5 if v.is_floating_point() else v for k, v in base.network.state_dict().items()}
    save_file({k: v.contiguous() for k, v in changed.items()}, file)
    assert not np.allclose(errors_of(load_denoiser(file, device="cpu", base_config=models[family]), images=images),
                           errors_of(base, images=images))


def test_a_single_file_without_its_base_says_so(models, tmp_path, capsys):
    file = tmp_path / "fine-tune.safetensors"
    save_file({"w": torch.zeros(1)}, file)
    image = tmp_path / "image.png"
    random_images(1)[0].save(image)
    code = main(["classify", str(image), "--model", str(file), "--labels", "a,b", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "single-file checkpoint: give its base pipeline with --config" in err
    with pytest.raises(UserError, match="is not a UNet2DConditionModel checkpoint"):
        load_denoiser(file, device="cpu", base_config=models["sd"])


# ----- the Python API's defaults -------------------------------------------------------------------------------
def test_the_python_api_defaults_are_the_clis():
    classify = build_parser()._subparsers._group_actions[0].choices["classify"]
    cli_defaults = {action.dest: action.default for action in classify._actions}
    for function in (DiffusionClassifier.from_pretrained, ImageTextMatcher.from_pretrained, load_denoiser):
        parameters = inspect.signature(function).parameters
        for name in ("device", "dtype"):
            assert parameters[name].default == cli_defaults[name] == "auto", (function, name)
    parameters = inspect.signature(load_denoiser).parameters
    for name in ("variant", "text_encoders"):
        assert parameters[name].default == cli_defaults[name] == "auto", name
    assert cli_defaults["base_config"] is None and parameters["base_config"].default is None
