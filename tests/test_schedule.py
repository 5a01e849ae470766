"""The cosine schedule (Nichol & Dhariwal 2021) and the buffers derived from it."""
import math

import pytest
import torch

from diffusion import Diffusion, cosine_schedule, extract
from unet import Unet


def reference_alphas(T, s=0.008):
    """An independent float64 loop over the definition."""
    f = lambda t: math.cos(((t / T + s) / (1 + s)) * math.pi / 2) ** 2
    return [min(max((f(t) / f(0)) / (f(t - 1) / f(0)), 0.001), 1.0) for t in range(1, T + 1)]


@pytest.mark.parametrize("T", [1, 10, 50, 1000])
def test_schedule_matches_a_plain_loop(T):
    alphas = cosine_schedule(T)
    assert alphas.dtype == torch.float64 and alphas.shape == (T,)
    assert torch.allclose(alphas, torch.tensor(reference_alphas(T), dtype=torch.float64), rtol=0, atol=1e-12)


def test_schedule_golden_values():
    alphas = cosine_schedule(50)
    cumprod = torch.cumprod(alphas, 0)
    assert alphas[0].item() == pytest.approx(0.9982524864661346, abs=1e-12)
    assert alphas[24].item() == pytest.approx(0.9406463357077433, abs=1e-12)
    assert alphas[49].item() == pytest.approx(0.001, abs=1e-15)  # clipped
    assert cumprod[24].item() == pytest.approx(0.49384359044063775, abs=1e-12)
    assert cumprod[49].item() == pytest.approx(9.711930298712557e-07, rel=1e-9)


def test_schedule_is_clipped_and_decreasing():
    alphas = cosine_schedule(1000)
    assert alphas.min() >= 0.001 and alphas.max() <= 1.0
    assert (alphas[-1] == 0.001) and (alphas[0] > 0.99)
    assert torch.all(torch.cumprod(alphas, 0).diff() < 0)


def test_buffers_are_float32_derived_from_the_clipped_alphas():
    d = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=50)
    alphas = torch.tensor(reference_alphas(50), dtype=torch.float64)
    cumprod = torch.cumprod(alphas, 0)
    for name, buf in d.named_buffers():
        if not name.startswith("model."):
            assert buf.dtype == torch.float32, name
    assert torch.allclose(d.alphas_cumprod.double(), cumprod, rtol=1e-6)
    assert d.alphas_cumprod_prev[0] == 1.0
    assert torch.allclose(d.alphas_cumprod_prev[1:].double(), cumprod[:-1], rtol=1e-6)
    assert torch.allclose(d.betas.double(), 1 - alphas, atol=1e-7)
    assert {n for n, _ in d.named_buffers()} >= {"alphas_cumprod", "posterior_variance", "posterior_mean_coef1"}


def test_extract_broadcasts_per_batch_element():
    a = torch.arange(10.0)
    t = torch.tensor([3, 0, 9])
    out = extract(a, t, (3, 2, 4, 4))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [3.0, 0.0, 9.0]
