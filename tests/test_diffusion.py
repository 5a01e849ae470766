"""q_sample, the posterior, the sampler and the loss, checked against closed forms."""
import math

import pytest
import torch
from torch import nn

from diffusion import Diffusion, cosine_schedule
from unet import Unet


class ConstantNoise(nn.Module):
    """A deterministic dummy 'model' that predicts eps = c * x_t."""

    def __init__(self, c=0.3):
        super().__init__()
        self.c = c
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        return self.c * x * self.weight


def make(T=50, model=None, size=8):
    return Diffusion(model or ConstantNoise(), image_size=size, channels=3, timesteps=T)


def test_q_sample_is_the_closed_form_with_the_bar():
    d = make()
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x_0)
    t = torch.tensor([0, 10, 25, 49])
    abar = torch.cumprod(cosine_schedule(50), 0)[t].float().view(-1, 1, 1, 1)
    expected = abar.sqrt() * x_0 + (1 - abar).sqrt() * noise
    assert torch.allclose(d.q_sample(x_0, t, noise), expected, atol=1e-6)


@pytest.mark.parametrize("step", [0, 20, 49])
def test_q_sample_mean_and_variance(step):
    torch.manual_seed(0)
    d = make()
    x_0 = torch.full((20000, 3, 1, 1), 0.7)
    t = torch.full((x_0.shape[0],), step)
    x_t = d.q_sample(x_0, t)
    abar = torch.cumprod(cosine_schedule(50), 0)[step].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.7, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - abar, abs=0.01 + 0.02 * (1 - abar))


@pytest.mark.parametrize("step", [1, 5, 25, 48, 49])
def test_posterior_matches_bayes_rule_numerically(step):
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0): integrate it on a grid."""
    T = 50
    alphas = cosine_schedule(T)
    abar = torch.cumprod(alphas, 0)
    a_t, abar_prev = alphas[step].item(), abar[step - 1].item()
    x0, xt = 0.4, -0.3
    grid = torch.linspace(-6, 6, 400001, dtype=torch.float64)
    log_lik = -((xt - math.sqrt(a_t) * grid) ** 2) / (2 * (1 - a_t))
    log_prior = -((grid - math.sqrt(abar_prev) * x0) ** 2) / (2 * (1 - abar_prev))
    w = torch.exp(log_lik + log_prior - (log_lik + log_prior).max())
    w = w / w.sum()
    mean_num = (w * grid).sum().item()
    var_num = (w * (grid - mean_num) ** 2).sum().item()

    d = make(T)
    x_0 = torch.full((1, 3, 8, 8), x0)
    x_t = torch.full((1, 3, 8, 8), xt)
    mean, var = d.q_posterior(x_0, x_t, torch.tensor([step]))
    assert mean[0, 0, 0, 0].item() == pytest.approx(mean_num, abs=1e-5)
    assert var.flatten()[0].item() == pytest.approx(var_num, rel=1e-3, abs=1e-7)


def test_posterior_at_the_first_step_is_x0():
    d = make()
    mean, var = d.q_posterior(torch.full((1, 3, 8, 8), 0.2), torch.zeros(1, 3, 8, 8), torch.tensor([0]))
    assert torch.allclose(mean, torch.full_like(mean, 0.2)) and var.item() == 0


def test_p_sample_follows_algorithm_2():
    T = 50
    d = make(T, ConstantNoise(0.3))
    alphas = cosine_schedule(T)
    abar = torch.cumprod(alphas, 0)
    x = torch.randn(2, 3, 8, 8) * 2
    for i in (30, 0):
        t = torch.full((2,), i)
        eps = 0.3 * x.double()
        x0_hat = ((x.double() - (1 - abar[i]).sqrt() * eps) / abar[i].sqrt()).clamp(-1, 1)
        abar_prev = abar[i - 1] if i > 0 else torch.tensor(1.0, dtype=torch.float64)
        mean = (alphas[i].sqrt() * (1 - abar_prev) / (1 - abar[i]) * x.double()
                + abar_prev.sqrt() * (1 - alphas[i]) / (1 - abar[i]) * x0_hat)
        var = (1 - abar_prev) / (1 - abar[i]) * (1 - alphas[i])
        g = torch.Generator().manual_seed(7)
        out = d.p_sample(x, t, i, generator=g)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)) if i > 0 else 0
        assert torch.allclose(out.double(), mean + var.sqrt() * noise, atol=1e-5), i


def test_last_step_adds_no_noise():
    d = make()
    x = torch.randn(2, 3, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    a = d.p_sample(x, t, 0, generator=torch.Generator().manual_seed(1))
    b = d.p_sample(x, t, 0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_seeded_sampler_repeats_exactly_and_stays_in_unit_range():
    torch.manual_seed(0)
    d = make(10, Unet(8, dim_mults=(1, 2)), size=8)
    a = d.sample(3, generator=torch.Generator().manual_seed(5))
    b = d.sample(3, generator=torch.Generator().manual_seed(5))
    c = d.sample(3, generator=torch.Generator().manual_seed(6))
    assert a.shape == (3, 3, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_loss_is_l1_on_the_noise():
    d = make(50, ConstantNoise(0.0))  # predicts zero noise: L1 = mean |eps|
    x_0 = torch.zeros(2, 3, 8, 8)
    noise = torch.randn_like(x_0)
    loss = d.p_loss(x_0, torch.tensor([3, 40]), noise)
    assert loss.item() == pytest.approx(noise.abs().mean().item(), rel=1e-6)


def test_loss_is_finite_and_reaches_every_parameter():
    torch.manual_seed(0)
    d = make(50, Unet(16), size=32)
    loss = d(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in d.model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_forward_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="expected images of shape"):
        make(size=8)(torch.zeros(1, 3, 16, 16))


def test_schedule_buffers_follow_the_module_to_another_device_and_dtype():
    d = make(model=Unet(8, dim_mults=(1, 2)))
    expected = d.alphas_cumprod.clone()
    d.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in d.buffers()) and d.alphas_cumprod.dtype == torch.float64
    assert torch.equal(d.to(torch.float32).alphas_cumprod, expected)
    d.to("meta")
    assert d.device == torch.device("meta")
    assert all(b.is_meta for b in d.buffers()) and all(p.is_meta for p in d.parameters())
    assert d.with_model(Unet(8, dim_mults=(1, 2))).device == torch.device("meta")


def test_ddim_with_every_step_and_eta_one_is_the_ddpm_chain():
    torch.manual_seed(0)
    d = make(20, Unet(8, dim_mults=(1, 2)), size=8)
    start = torch.randn(2, 3, 8, 8)
    ddpm = d.p_sample_loop(start, generator=torch.Generator().manual_seed(3))
    ddim = d.ddim_sample_loop(start, 20, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_ddim_with_fewer_steps_is_deterministic_and_used_by_sample():
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2))
    d = Diffusion(model, image_size=8, timesteps=50, sampling_timesteps=10)
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[1][0].item()))
    start = torch.randn(2, 3, 8, 8)
    a = d.ddim_sample_loop(start, 10, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(start, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert calls == [49, 44, 38, 33, 27, 22, 16, 11, 5, 0] * 2
    calls.clear()
    d.sample(2)
    assert len(calls) == 10
    with pytest.raises(ValueError, match="sampling_timesteps must be between 1 and T = 50"):
        Diffusion(model, image_size=8, timesteps=50, sampling_timesteps=51)
