"""Today's families behind the same Denoiser interface: tiny random-weight pipelines saved with
diffusers' own save_pretrained, loaded back through load_denoiser, checked against diffusers' own
prompt encoding and run end to end through classify, evaluate and match."""

import json

import numpy as np
import pytest
import torch

from diffusion_classifier import DiffusionClassifier, Exhaustive, load_denoiser
from diffusion_classifier.adapters.schedules import RectifiedFlowSchedule
from diffusion_classifier.adapters.sd3 import SD3Denoiser
from diffusion_classifier.cli import main
from diffusion_classifier.tasks.matching.matcher import ImageTextMatcher

from .conftest import image_folder, random_images


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5"])
def test_sd3_prompts_are_encoded_as_diffusers_encodes_them(models, name):
    from diffusers import StableDiffusion3Pipeline

    denoiser = load_denoiser(models[name])
    assert isinstance(denoiser, SD3Denoiser) and isinstance(denoiser.schedule, RectifiedFlowSchedule)
    assert denoiser.schedule.shift == 3.0 and denoiser.prediction_type == "flow"
    prompts = ["a photo of a cat", "a dog"]
    ours = denoiser.embed_conditions(prompts)
    absent = {"text_encoder_3": None, "tokenizer_3": None} if name == "sd3_no_t5" else {}
    pipe = StableDiffusion3Pipeline.from_pretrained(models[name], **absent)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=12)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["pooled_projections"], pooled)
    if name == "sd3_no_t5":
        assert (ours["encoder_hidden_states"][:, -12:] == 0).all()


def test_sd3_network_gets_sigma_times_1000_and_its_velocity_becomes_an_epsilon(models):
    denoiser = load_denoiser(models["sd3"])
    cond = denoiser.embed_conditions(["a cat", "a dog"])
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    sigma = denoiser.schedule.sigmas[t].float().view(-1, 1, 1, 1)
    x_t = (1 - sigma) * x0 + sigma * eps
    with torch.inference_mode():
        v = denoiser.network(hidden_states=x_t, timestep=sigma.flatten() * 1000, **cond).sample
    expected = ((eps - (x_t + (1 - sigma) * v)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(denoiser.error(x0, eps, t, cond), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sd3", "sd3_no_t5"])
def test_flow_families_classify_evaluate_and_match_end_to_end(models, name, tmp_path, capsys):
    images = random_images(2)
    clf = DiffusionClassifier.from_pretrained(models[name], labels=["cat", "dog"], templates=["a photo of a {}."],
                                              strategy=Exhaustive(3), seed=4)
    first, again = clf.classify(images), clf.classify(images)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.errors, b.errors)  # same seed, same result
        assert np.isfinite(a.errors).all() and a.timesteps == [166, 499, 832]  # both labels at the same pairs
    matching = ImageTextMatcher.from_pretrained(models[name], strategy=Exhaustive(3)).match(images, ["a cat", "a dog"])
    assert np.isfinite(matching.matrix("unconditional")).all()
    data = image_folder(tmp_path / "data", ["cat", "dog"], 2, size=16, mode="RGB")
    assert main(["evaluate", "--model", str(models[name]), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--template", "a photo of a {}.", "--timesteps", "2", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 4


def test_sdxl_prompts_time_ids_and_network_call_follow_diffusers(models):
    from diffusers import StableDiffusionXLPipeline

    from diffusion_classifier.adapters.sdxl import SDXLDenoiser

    denoiser = load_denoiser(models["sdxl"])
    assert isinstance(denoiser, SDXLDenoiser) and denoiser.image_size == (16, 16)
    prompts = ["a photo of a cat", "a dog"]
    ours = denoiser.embed_conditions(prompts)
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["text_embeds"], pooled)
    expected_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32,
                                          text_encoder_projection_dim=pooled.shape[-1])
    torch.testing.assert_close(denoiser.time_ids(2), expected_ids.repeat(2, 1))
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.inference_mode():
        direct = pipe.unet(x_t, t, encoder_hidden_states=embeds,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": expected_ids.repeat(2, 1)}).sample
    torch.testing.assert_close(denoiser.predict_noise(x_t, t, ours), direct)  # epsilon model: no conversion


def test_sdxl_classifies_and_matches_end_to_end(models):
    images = random_images(2)
    clf = DiffusionClassifier.from_pretrained(models["sdxl"], labels=["cat", "dog"], strategy=Exhaustive(3))
    for r in clf.classify(images):
        assert np.isfinite(r.errors).all() and r.nfe == 6
    assert np.isfinite(ImageTextMatcher.from_pretrained(models["sdxl"], strategy=Exhaustive(2))
                       .match(images, ["a cat", "a dog"]).matrix("unconditional")).all()


def test_flux_packing_round_trips_and_matches_diffusers():
    from diffusers import FluxPipeline

    from diffusion_classifier.adapters.flux import image_ids, pack, unpack

    latents = torch.randn(2, 4, 8, 6)
    tokens = pack(latents)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    torch.testing.assert_close(unpack(tokens, 8, 6), latents)
    torch.testing.assert_close(image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


@pytest.mark.parametrize("name", ["flux_schnell", "flux_dev"])
def test_flux_prompts_shift_and_network_call_follow_diffusers(models, name):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from diffusion_classifier.adapters.flux import FluxDenoiser, image_ids, pack, unpack

    denoiser = load_denoiser(models[name])
    assert isinstance(denoiser, FluxDenoiser) and denoiser.image_size == (16, 16)
    assert denoiser.schedule.shift == pytest.approx(np.exp(calculate_shift(16)))  # 4 x 4 packed tokens
    pipe = FluxPipeline.from_pretrained(models[name])
    prompts = ["a photo of a cat", "a dog"]
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=12)
    ours = denoiser.embed_conditions(prompts)
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds)
    torch.testing.assert_close(ours["pooled_projections"], pooled)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 950])
    sigma = denoiser.schedule.sigmas[t].float()
    extra = {"guidance": torch.full((2,), 1.0)} if name == "flux_dev" else {}
    with torch.inference_mode():
        v = pipe.transformer(hidden_states=pack(x_t), timestep=sigma, pooled_projections=pooled,
                             encoder_hidden_states=embeds, txt_ids=torch.zeros(12, 3), img_ids=image_ids(8, 8),
                             **extra).sample
    expected = x_t + (1 - sigma.view(-1, 1, 1, 1)) * unpack(v, 8, 8)
    torch.testing.assert_close(denoiser.predict_noise(x_t, t, ours), expected)


@pytest.mark.parametrize("name", ["flux_schnell", "flux_dev", "sdxl"])
def test_new_families_run_evaluate_and_match(models, name, tmp_path, capsys):
    images = random_images(2)
    matcher = ImageTextMatcher.from_pretrained(models[name], strategy=Exhaustive(2), seed=1)
    a, b = matcher.match(images, ["a cat", "a dog"]), matcher.match(images, ["a cat", "a dog"])
    np.testing.assert_array_equal(a.matrix(), b.matrix())
    data = image_folder(tmp_path / "data", ["cat", "dog"], 1, size=16, mode="RGB")
    assert main(["evaluate", "--model", str(models[name]), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--timesteps", "2", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 2
