"""The speed levers change how the numbers are computed, never which numbers (benchmarks/ says how fast)."""
import contextlib
import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from diffusion import Diffusion
from hw2.sampling import generate, images_per_pass
from unet import LinearAttention, Unet


@pytest.mark.parametrize("channels,side", [(16, 32), (32, 16), (8, 8), (64, 4)])
def test_the_folded_linear_attention_is_the_direct_one(channels, side):
    torch.manual_seed(channels)
    attention = LinearAttention(channels)
    with torch.no_grad():
        for p in attention.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # a bias and gain away from their initial values
    x = torch.randn(3, channels, side, side, requires_grad=True)
    norm = attention.to_out[1]
    direct, folded = norm(attention.direct(x)), norm(attention.folded(x))
    assert torch.allclose(direct, folded, atol=1e-5), (direct - folded).abs().max()
    grads = [torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                 [x, *attention.parameters()]) for y in (direct, folded)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_fixed_weights_reuse_the_standardized_kernels_only_while_fixed():
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2)).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 7])
    with torch.no_grad():
        plain = model(x, t)
        with model.fixed_weights():
            assert torch.allclose(model(x, t), plain, atol=1e-6)
            assert torch.allclose(model(x, t), plain, atol=1e-6)  # and again, from the stored kernels
        for p in model.parameters():
            p.mul_(1.1)
        after = model(x, t)
        with model.fixed_weights():
            assert torch.allclose(model(x, t), after, atol=1e-6)  # nothing stale from the first time
    assert not torch.allclose(after, plain)


def test_sampling_through_fixed_weights_equals_plain_sampling(monkeypatch):
    torch.manual_seed(0)
    d = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=8, timesteps=6)
    fixed = d.sample(2, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(Diffusion, "fixed_weights", lambda self: contextlib.nullcontext())
    plain = d.sample(2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(fixed, plain, atol=1e-5)


def test_images_per_pass_by_device_precision_and_size():
    assert images_per_pass("cpu", 32) == 32 and images_per_pass("cpu", 32, torch.bfloat16) == 64
    assert images_per_pass("cpu", 64) == 8 and images_per_pass("cpu", 256) == 1
    assert images_per_pass("cuda", 32, torch.float16) == images_per_pass("cuda", 64) == 256


def test_generate_draws_in_passes_sized_for_its_images(monkeypatch):
    torch.manual_seed(0)
    d = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=64, timesteps=2)
    passes, real = [], Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample", lambda self, n, **kw: passes.append(n) or real(self, n, **kw))
    images = generate(d, 20, seed=0)
    assert passes == [8, 8, 4] and images.shape == (20, 3, 64, 64)


A_BLOCK_OF_A_STEP = """
import ctypes, sys, torch
from hw2.memory import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo = ctypes.CDLL(None).mallinfo2
mallinfo.restype = Mallinfo2
print(keep_freed_memory() if sys.argv[1] == "keep" else None)
mapped = mallinfo().hblkhd
block = torch.ones(6 << 20)  # 24 MiB: above glibc's default threshold, below its 32 MiB ceiling
print((mallinfo().hblkhd - mapped) >> 20)  # MiB mapped from the kernel for it
del block
print(mallinfo().fordblks >> 20)  # MiB kept free in malloc's heap after it
"""


def has_mallinfo2():
    try:
        return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc's malloc only (mallinfo2 from 2.33 on); elsewhere nothing changes")
@pytest.mark.parametrize("how,env,kept", [("keep", {}, True), ("plain", {}, False),
                                          ("keep", {"MALLOC_ARENA_MAX": "2"}, False)])  # the user's settings win
def test_freed_memory_is_kept_for_reuse_unless_the_user_set_malloc(how, env, kept):
    proc = subprocess.run([sys.executable, "-c", A_BLOCK_OF_A_STEP, how], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=True)
    note, mapped, free = proc.stdout.splitlines()
    assert note == ("freed memory kept for reuse" if kept else "None")
    assert (int(mapped), int(free) >= 24) == ((0, True) if kept else (24, False)), proc.stdout
