"""Mixed precision: the choice of dtype, and float32 where the math needs it."""
import math
import os
import statistics
import time

import pytest
import torch

from diffusion import Diffusion
from hw2 import fast, precision
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


def cpu_flags():
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else None


def test_native_bf16_detection_on_this_machine():
    """No mock: the probe must agree with the CPU's own flags and with how fast bf16 really is here."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()  # oneDNN told to stop short of bf16 (an AVX2 stand-in)
    native = native and (isa == "ALL" or "BF16" in isa or "AMX" in isa)
    assert precision.cpu_has_native_bf16() is native

    a = torch.randn(1024, 1024)

    def median_time(x):
        times = []
        for _ in range(7):
            start = time.perf_counter()
            x @ x
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    fp32, bf16 = median_time(a), median_time(a.bfloat16())
    assert (bf16 < fp32) is native, (fp32, bf16)


class FakeGPU:
    """torch's device queries answered as a GPU of the given compute capability answers them:
    every one of them can create bfloat16 tensors, so is_bf16_supported() says True."""

    def __init__(self, monkeypatch, capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("capability", [(7, 5), (8, 0), (8, 6), (9, 0)])
def test_auto_on_cuda_picks_float32_which_was_fastest_on_a_gpu(monkeypatch, capability):
    FakeGPU(monkeypatch, capability)
    assert amp_dtype("auto", "cuda") is None
    assert precision.describe_precision("auto", "cuda", None) == (
        "float32: the fastest for this model on a GPU (its step is bound by kernel launches)")
    assert amp_dtype("bf16", "cuda") is torch.bfloat16 and amp_dtype("fp16", "cuda") is torch.float16


def test_bf16_asked_for_on_a_t4_is_allowed_with_one_warning(monkeypatch, capsys):
    FakeGPU(monkeypatch, (7, 5))
    monkeypatch.setattr(precision, "_warned", set())
    assert amp_dtype("bf16", "cuda") is torch.bfloat16
    assert amp_dtype("bf16", "cuda") is torch.bfloat16
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: --amp bf16 on a GPU of compute capability 7.5: bfloat16 is emulated there and slow; "
                   "--amp fp16 uses its float16 tensor cores"]
    assert amp_dtype("fp16", "cuda") is torch.float16


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


def test_float16_steps_with_overflowing_gradients_are_skipped_not_applied(tiny_config):
    """The fp16 path (GradScaler with the fused Adam) as a T4 runs it, exercised on the CPU."""
    from trainer import Trainer

    torch.manual_seed(0)
    d = Diffusion(fast.speed_up(Unet(8, dim_mults=(1, 2))), image_size=16, timesteps=10)  # as main.py builds it
    trainer = Trainer(d, tiny_config, torch.randint(0, 255, (8, 3, 17, 17), dtype=torch.uint8),
                      amp_dtype=torch.float16)
    assert trainer.scaler.is_enabled() and trainer.opt.defaults.get("fused")
    weight = d.model.init_conv.weight
    hook = weight.register_hook(lambda grad: grad * float("inf"))
    before, scale = weight.detach().clone(), trainer.scaler.get_scale()
    assert math.isfinite(trainer.train_step())
    assert torch.equal(weight, before) and trainer.scaler.get_scale() == scale / 2  # skipped, scale lowered
    hook.remove()
    trainer.train_step()
    assert not torch.equal(weight, before) and torch.isfinite(weight).all()
