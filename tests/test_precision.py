"""Mixed precision: the choice of dtype, and float32 where the math needs it."""
import pytest
import torch

from diffusion import Diffusion
from hw2 import precision
from hw2.errors import UserError
from hw2.precision import amp_dtype, autocast
from unet import Unet


def test_explicit_choices():
    assert amp_dtype("off", "cpu") is None
    assert amp_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA GPU"):
        amp_dtype("fp16", "cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_follows_native_bf16(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert amp_dtype("auto", "cpu") is (torch.bfloat16 if native else None)


def test_auto_is_float32_on_mps():
    assert amp_dtype("auto", "mps") is None


def test_under_bf16_the_model_runs_in_bf16_and_the_loss_in_float32():
    torch.manual_seed(0)
    d = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10)
    x_0 = torch.rand(2, 3, 16, 16) * 2 - 1
    with autocast("cpu", torch.bfloat16):
        out = d.model(x_0, torch.tensor([1, 2]))
        x_t = d.q_sample(x_0, torch.tensor([1, 2]))
        loss = d(x_0)
        samples = d.sample(2, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    assert x_t.dtype == torch.float32 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert samples.dtype == torch.float32 and 0 <= samples.min() and samples.max() <= 1
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in d.model.parameters())
