"""Noise schedules: the VP one reproduces the scheduler, the rectified-flow one converts velocities to the
epsilon error exactly; both give the same grids to strategies."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_classifier import UserError, load_denoiser
from diffusion_classifier.adapters.denoiser import Denoiser
from diffusion_classifier.adapters.schedules import (
    NoiseSchedule,
    RectifiedFlowSchedule,
    VPSchedule,
    even_timesteps,
    schedule_from_scheduler,
)

from .test_denoisers import _Oracle


class FlowOracle(Denoiser):
    """A network that returns the velocity it is handed; the adapter layer does the rest."""

    conditioning = "class"

    def __init__(self, shift=3.0):
        super().__init__(_Oracle(), FlowMatchEulerDiscreteScheduler(shift=shift))

    def _network(self, x_t, t, cond):
        return self.network.output


def test_the_flow_schedule_is_the_schedulers_own_training_schedule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = schedule_from_scheduler(scheduler)
    assert isinstance(schedule, RectifiedFlowSchedule) and schedule.num_train_timesteps == 1000
    # diffusers lists sigmas from the noisiest down; position t is the (t+1)-th smallest
    torch.testing.assert_close(schedule.sigmas.float(), scheduler.sigmas.flip(0), rtol=1e-6, atol=1e-7)
    t = torch.tensor([0, 499, 999])
    torch.testing.assert_close(schedule.model_timestep(t), schedule.sigmas[t].float() * 1000)
    sigma = schedule.sigmas[t]
    torch.testing.assert_close(schedule.alpha_bar(t), (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2))
    assert (schedule.log_snr()[1:] < schedule.log_snr()[:-1]).all()  # noisier as t grows, like VP
    assert schedule.grid(10) == even_timesteps(1000, 10) == NoiseSchedule(1000).grid(10)


def test_the_vp_schedule_matches_the_scheduler():
    scheduler = DDPMScheduler()
    schedule = schedule_from_scheduler(scheduler)
    assert isinstance(schedule, VPSchedule)
    t = torch.tensor([3, 500, 998])
    abar = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    a, b = schedule.scales(t)
    torch.testing.assert_close(a, abar.sqrt())
    torch.testing.assert_close(b, (1 - abar).sqrt())
    assert torch.equal(schedule.model_timestep(t), t)


def test_an_exact_velocity_scores_zero_error_and_a_velocity_error_maps_to_the_epsilon_error():
    denoiser = FlowOracle()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([10, 500, 990])
    denoiser.network.output = eps - x0  # the true velocity
    assert denoiser.error(x0, eps, t, {}).abs().max() < 1e-10
    delta = 0.1 * torch.randn(3, 1, 4, 4)
    denoiser.network.output = eps - x0 + delta
    sigma = denoiser.schedule.sigmas[t].float()
    expected = (1 - sigma) ** 2 * delta.pow(2).flatten(1).mean(1)  # (1 - sigma)^2 times the velocity error
    torch.testing.assert_close(denoiser.error(x0, eps, t, {}), expected, rtol=1e-5, atol=1e-8)


def test_flow_noising_is_the_straight_line():
    schedule = RectifiedFlowSchedule(shift=1.0)
    x0, eps = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    t = torch.tensor([0, 999])
    x_t = schedule.noised(x0, eps, t)
    torch.testing.assert_close(x_t[1], eps[1])  # sigma = 1 at the last position
    torch.testing.assert_close(x_t[0], 0.999 * x0[0] + 0.001 * eps[0])


def test_unsupported_schedules_and_pipelines_are_clear_errors(models, tmp_path):
    with pytest.raises(UserError, match="dynamic"):
        schedule_from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    with pytest.raises(UserError, match="prediction_type"):
        VPSchedule(DDPMScheduler().alphas_cumprod, "velocity")
    import shutil

    other = tmp_path / "other"
    shutil.copytree(models["pixel_class"], other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="KandinskyPipeline.*not supported"):
        load_denoiser(other)


def test_velocity_errors_are_reweighted_epsilon_errors():
    flow = FlowOracle()
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([10, 500, 990])
    flow.network.output = eps - x0 + 0.1 * torch.randn(3, 1, 4, 4)
    sigma = flow.schedule.sigmas[t].float()
    torch.testing.assert_close(flow.error(x0, eps, t, {}, target="velocity"),
                               flow.error(x0, eps, t, {}) / (1 - sigma) ** 2, rtol=1e-4, atol=1e-7)
    from .test_denoisers import OracleDenoiser

    vp = OracleDenoiser("epsilon")
    vp.network.output = eps + 0.1 * torch.randn(3, 1, 4, 4)
    abar = vp.schedule.alpha_bar(t).float()
    torch.testing.assert_close(vp.error(x0, eps, t, {}, target="velocity"), vp.error(x0, eps, t, {}) / abar,
                               rtol=1e-4, atol=1e-7)


def test_the_logit_normal_grid_has_the_training_densitys_quantiles():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    torch.manual_seed(0)
    u = compute_density_for_timestep_sampling("logit_normal", 200_000, logit_mean=0.0, logit_std=1.0)
    sampled = 999 - (u * 1000).long().clamp(max=999)  # what SD3's trainer draws, as our positions
    grid = torch.tensor(RectifiedFlowSchedule(shift=3.0).with_grid("logit-normal").grid(9), dtype=torch.float64)
    quantiles = torch.quantile(sampled.double(), (torch.arange(9, dtype=torch.float64) + 0.5) / 9)
    assert (grid - quantiles).abs().max() <= 3
    assert NoiseSchedule(1000).grid(9) == even_timesteps(1000, 9)  # the default stays the paper's grid


def test_elbo_weights_of_a_flow_schedule_are_finite_and_follow_its_sigmas():
    schedule = RectifiedFlowSchedule(shift=1.0)  # the last position is pure noise: log-SNR = -inf
    assert not torch.isfinite(schedule.log_snr()[-1])
    weights = schedule.elbo_weights()
    assert torch.isfinite(weights).all() and (weights > 0).all() and weights.mean().item() == pytest.approx(1.0)
    # log-SNR = 2 log((1 - sigma) / sigma), so -d logSNR / d sigma = 2 / (sigma (1 - sigma)); sigma is linear in t
    sigma = schedule.sigmas
    inner = slice(10, -10)
    analytic = 2 / (sigma * (1 - sigma))
    ratio = weights[inner] / analytic[inner]
    assert (ratio / ratio.mean() - 1).abs().max() < 0.02
    assert weights[-1] == pytest.approx(weights[-2].item(), rel=0.05)


def test_elbo_weights_follow_the_log_snr_and_multiply_the_errors(models):
    from diffusion_classifier import DiffusionClassifier, Exhaustive

    from .conftest import random_images

    schedule = VPSchedule(DDPMScheduler().alphas_cumprod)
    weights = schedule.elbo_weights()
    assert weights.mean().item() == pytest.approx(1.0) and (weights > 0).all()
    assert weights.argmax() == 0 and weights[0] > 10 * weights[500]  # log-SNR falls fastest at low noise
    images = random_images(2, size=8, mode="L")
    plain = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(4)).classify(images)
    elbo = DiffusionClassifier.from_pretrained(models["pixel_class"], strategy=Exhaustive(4),
                                               weighting="elbo").classify(images)
    for a, b in zip(plain, elbo):
        expected = a.errors * weights[a.timesteps].numpy()[None, None, :]
        torch.testing.assert_close(torch.as_tensor(b.errors), torch.as_tensor(expected), rtol=1e-5, atol=1e-9)
