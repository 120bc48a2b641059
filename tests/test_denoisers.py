import json

import pytest
import torch

from diffusion_classifier import UserError, load_denoiser
from diffusion_classifier.adapters.class_unet import ClassUNetDenoiser
from diffusion_classifier.adapters.denoiser import Denoiser, per_sample_error
from diffusion_classifier.adapters.dit import DiTDenoiser
from diffusion_classifier.adapters.text_unet import TextUNetDenoiser

from .conftest import CLASSES


@pytest.mark.parametrize("name, cls, conditioning, resolution, channels", [
    ("sd", TextUNetDenoiser, "text", 16, 3),
    ("sd_v", TextUNetDenoiser, "text", 16, 3),
    ("dit", DiTDenoiser, "class", 16, 3),
    ("pixel_class", ClassUNetDenoiser, "class", 8, 1),
    ("pixel_text", TextUNetDenoiser, "text", 8, 1),
])
def test_every_family_loads_from_its_saved_directory(models, name, cls, conditioning, resolution, channels):
    denoiser = load_denoiser(models[name])
    assert isinstance(denoiser, cls)
    assert denoiser.conditioning == conditioning
    assert denoiser.resolution == resolution
    assert denoiser.image_channels == channels
    assert denoiser.num_train_timesteps == 1000
    expected_type = "v_prediction" if name == "sd_v" else "epsilon"
    assert denoiser.prediction_type == expected_type


def test_class_names_come_from_saved_config(models):
    assert load_denoiser(models["dit"]).class_names == CLASSES
    assert load_denoiser(models["pixel_class"]).class_names == CLASSES


def test_latent_models_encode_to_scaled_vae_mean(models):
    denoiser = load_denoiser(models["sd"])
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = denoiser.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 8)
    expected = denoiser.vae.encode(pixels).latent_dist.mean * denoiser.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected)


def test_text_embeddings_have_one_row_per_prompt(models):
    denoiser = load_denoiser(models["pixel_text"])
    cond = denoiser.embed_conditions(["a cat", "a dog", "a bird"])
    assert cond["encoder_hidden_states"].shape == (3, 12, 32)
    assert cond["encoder_attention_mask"].shape == (3, 12)
    assert not torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])


def test_dit_scores_the_eps_half_of_learned_sigma_output(models):
    denoiser = load_denoiser(models["dit"])
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    cond = denoiser.embed_conditions([0, 1])
    full = denoiser.network(x, timestep=t, class_labels=cond["class_labels"]).sample
    assert full.shape[1] == 8
    torch.testing.assert_close(denoiser.predict_noise(x, t, cond), full[:, :4])


class _Oracle(torch.nn.Module):
    """Returns whatever tensor it was given; lets us test prediction-type conversions exactly."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.output = None


class OracleDenoiser(Denoiser):
    conditioning = "class"

    def __init__(self, prediction_type):
        from diffusers import DDPMScheduler

        super().__init__(_Oracle(), DDPMScheduler(prediction_type=prediction_type))

    def _network(self, x_t, t, cond):
        return self.network.output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_a_perfect_model_has_zero_error_for_every_prediction_type(prediction_type):
    denoiser = OracleDenoiser(prediction_type)
    oracle = denoiser.network
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1, 400, 999])
    abar = denoiser.schedule.alpha_bar(t).float().view(-1, 1, 1, 1)
    oracle.output = {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0,
                     "sample": x0}[prediction_type]
    errors = denoiser.error(x0, eps, t, {}, "l2")
    assert errors.shape == (3,)
    assert errors.abs().max() < 1e-5
    # and an imperfect v-model's eps error is abar times its v error (l2), our documented footing
    if prediction_type == "v_prediction":
        v_true = oracle.output.clone()
        oracle.output = v_true + 0.1
        eps_err = denoiser.error(x0, eps, t, {}, "l2")
        torch.testing.assert_close(eps_err, abar.flatten() * 0.01, rtol=1e-4, atol=1e-6)


def test_losses_match_their_definitions():
    a, b = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    torch.testing.assert_close(per_sample_error(a, b, "l2"), ((a - b) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(per_sample_error(a, b, "l1"), (a - b).abs().mean(dim=(1, 2, 3)))
    d = (a - b).abs()
    huber = torch.where(d < 1, 0.5 * d**2, d - 0.5).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample_error(a, b, "huber"), huber)
    with pytest.raises(UserError):
        per_sample_error(a, b, "l3")


def test_missing_or_malformed_directories_are_clear_errors(models, tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        load_denoiser(tmp_path)
    with pytest.raises(UserError, match="unknown model"):
        load_denoiser("no-such-model")
    broken = tmp_path / "broken"
    broken.mkdir()
    index = json.loads((models["pixel_class"] / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="missing the 'scheduler' folder"):
        load_denoiser(broken)
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_denoiser(broken)


def test_denoiser_save_pretrained_round_trips(models, tmp_path):
    denoiser = load_denoiser(models["pixel_text"])
    denoiser.save_pretrained(tmp_path / "copy")
    again = load_denoiser(tmp_path / "copy")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    cond = denoiser.embed_conditions(["a cat", "a dog"])
    torch.testing.assert_close(denoiser.predict_noise(x, t, cond),
                               again.predict_noise(x, t, again.embed_conditions(["a cat", "a dog"])))


@pytest.mark.parametrize("cls_name, settings", [
    ("PNDMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                           steps_offset=1)),  # Stable Diffusion 1.x style
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False)),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)),
])
def test_schedulers_load_like_diffusers_from_pretrained(tmp_path, cls_name, settings):
    import diffusers

    from diffusion_classifier.adapters.loading import load_scheduler as _load_scheduler

    cls = getattr(diffusers, cls_name)
    cls(**settings).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    config["an_unknown_key_from_a_newer_diffusers"] = 1
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    ours, theirs = _load_scheduler(cls, tmp_path), cls.from_pretrained(tmp_path)
    public = lambda scheduler: {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(ours) == {k: v for k, v in public(theirs).items() if k != "an_unknown_key_from_a_newer_diffusers"}
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
