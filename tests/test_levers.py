"""The speed levers change how the numbers are computed, never which numbers (benchmarks/ says how fast)."""
import contextlib
import copy
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
from unet import Block, LinearAttention, ResnetBlock, Unet, Upsample


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


def perturbed_attention(channels, scale=0.2):
    attention = LinearAttention(channels)
    with torch.no_grad():
        for p in attention.parameters():
            p.add_(torch.randn_like(p) * scale)  # a bias and gain away from their initial values
    return attention


def pixels(x):
    """(B, C, H, W) -> (B, H*W, C), as folded() hands it to base2()."""
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("channels,side,layout", [(16, 32, torch.channels_last), (32, 16, torch.contiguous_format)])
def test_sampling_takes_the_softmaxes_in_base_2_to_the_same_numbers(channels, side, layout, monkeypatch):
    """In float32 on a CPU without gradient, folded() (torch's path, where the compiled kernel is
    not built) takes exp2 with no max subtracted; the same attention as the homework's
    computation (direct())."""
    torch.manual_seed(channels)
    attention = perturbed_attention(channels)
    taken, base2 = [], LinearAttention.base2
    monkeypatch.setattr(LinearAttention, "base2", lambda self, x_t: taken.append(base2(self, x_t)) or taken[-1])
    x = torch.randn(3, channels, side, side).contiguous(memory_format=layout) * 2
    norm = attention.to_out[1]
    with torch.no_grad():
        direct, folded = norm(attention.direct(x)), norm(attention.folded(x))
    assert taken == [True]
    assert torch.allclose(direct, folded, atol=1e-5), (direct - folded).abs().max()


def test_softmaxes_beyond_the_exponent_bound_take_the_usual_way(monkeypatch):
    """Weights or inputs large enough for 2^z to overflow float32: folded() subtracts the max as
    usual (the bound is what keeps base 2 safe); so do training, bfloat16, NaNs and other devices."""
    torch.manual_seed(0)
    attention = perturbed_attention(16)
    with torch.no_grad():
        attention.to_qkv.weight.mul_(40)
    x = torch.randn(2, 16, 32, 32) * 3
    with torch.no_grad():
        assert not attention.base2(pixels(x))
        direct, folded = attention.direct(x), attention.folded(x)
        assert torch.isfinite(folded).all() and torch.allclose(direct, folded, atol=1e-4, rtol=1e-4)
        monkeypatch.setattr(LinearAttention, "base2", lambda self, x_t: True)  # were it taken anyway
        assert not torch.isfinite(attention.folded(x)).all()
    monkeypatch.undo()
    small = perturbed_attention(16)
    x = torch.randn(2, 16, 32, 32)
    spike = x.clone()
    row = small.to_qkv.weight[0].flatten()
    spike[1, :, 7, 9] = 200 * row / row.norm()  # one pixel far out, along a row of W_q
    with torch.no_grad():
        assert small.base2(pixels(x)) and not small.base2(pixels(spike))
        assert torch.allclose(small.folded(spike), small.direct(spike), atol=1e-4, rtol=1e-4)
        assert not small.base2(pixels(x).bfloat16())
        assert not small.base2(pixels(x).index_fill(1, torch.tensor([5]), float("nan")))
        assert not small.base2(pixels(x).to("meta"))
    assert not small.base2(pixels(x))  # with a gradient


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


def test_images_per_pass_by_device_precision_size_and_kernel(monkeypatch):
    """Twice the images on a CPU where the attention kernel runs (its temporaries are small)."""
    from hw2 import kernels

    monkeypatch.setattr(kernels, "_built", {"lib": None, "why": "no C compiler (cc) found"})
    assert images_per_pass("cpu", 32) == 32 and images_per_pass("cpu", 32, torch.bfloat16) == 64
    assert images_per_pass("cpu", 64) == 8 and images_per_pass("cpu", 256) == 1
    assert images_per_pass("cuda", 32, torch.float16) == images_per_pass("cuda", 64) == 256
    monkeypatch.setattr(kernels, "_built", {"lib": print, "why": None})
    assert images_per_pass("cpu", 32) == 64 and images_per_pass("cpu", 32, torch.bfloat16) == 128
    assert images_per_pass("cpu", 64) == 16 and images_per_pass("cpu", 30) == 36  # 900 px: torch's attention
    assert images_per_pass("cuda", 32) == 256


def test_generate_draws_in_passes_sized_for_its_images(monkeypatch):
    torch.manual_seed(0)
    d = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=64, timesteps=2)
    passes, real = [], Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample", lambda self, n, **kw: passes.append(n) or real(self, n, **kw))
    images = generate(d, 20, seed=0)
    per_pass = images_per_pass("cpu", 64)  # 8, or 16 where the attention kernel runs
    assert passes == [per_pass] * (20 // per_pass) + [20 % per_pass] and images.shape == (20, 3, 64, 64)


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


def stored_channels_last(model, x, t):
    """{block name: whether its output was stored channels-last (channels innermost)} for one pass."""
    seen = {}
    for name in ("init_conv", "downs.0.0", "downs.0.2.fn.norm", "downs.0.2", "downs.1.0", "mid_block1", "ups.2.3",
                 "ups.3.0", "final_res_block"):
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, y.stride(1) == 1))
    model(x, t)
    return seen


def test_on_a_cpu_sampling_stores_the_large_maps_channels_last_and_training_none():
    model, t = Unet(8), torch.tensor([3, 9])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sampling = stored_channels_last(model, x, t)
    top = {"init_conv", "downs.0.0", "downs.0.2.fn.norm", "downs.0.2", "ups.2.3", "ups.3.0", "final_res_block"}
    assert {name for name, last in sampling.items() if last} == top  # 32 x 32 maps; 16 x 16 and below as usual
    assert not any(stored_channels_last(Unet(8), x, t).values())  # with a gradient: as usual
    with torch.no_grad():
        assert not any(stored_channels_last(Unet(8), torch.randn(2, 3, 16, 16), t).values())  # no map that large
        assert all(stored_channels_last(Unet(8, channels_last=True), x, t).values())  # --channels_last
        assert not any(stored_channels_last(Unet(8, channels_last=False), x, t).values())


def test_every_layout_gives_the_same_gradients():
    """Training runs as usual, with the time modulation inside GroupNorm's own affine; channels-last
    runs it as a separate multiply-add. Same function, same gradients."""
    torch.manual_seed(0)
    usual, channels_last = Unet(8, dim_mults=(1, 2)), Unet(8, dim_mults=(1, 2), channels_last=True)
    with torch.no_grad():
        for p in usual.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms' gains and biases away from 1 and 0
    channels_last.load_state_dict(usual.state_dict())
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 20, 49])
    grads = []
    for model in (usual, channels_last):
        loss = (model(x, t) * torch.linspace(-1, 1, x.numel()).view_as(x)).mean()
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, _), a, b in zip(usual.named_parameters(), *grads):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max() + 1e-6, name  # float rounding, at each tensor's scale


@pytest.mark.parametrize("channels_last", [None, True])
def test_under_bf16_autocast_the_blocks_hand_on_bf16(channels_last):
    """No block's output goes back to float32 (which would cost a cast before every next conv)."""
    model, dtypes = Unet(8, dim_mults=(1, 2), channels_last=channels_last), set()
    for module in model.modules():
        if isinstance(module, Block):
            module.register_forward_hook(lambda m, a, y: dtypes.add(y.dtype))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_sub_pixel_upsample_is_upsampling_then_the_conv(layout):
    """Against the homework's own path through the same two modules: nn.Upsample, then the conv."""
    torch.manual_seed(0)
    up = Upsample(6, 4)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout).requires_grad_()
    ours, theirs = up(x), torch.nn.Sequential.forward(up, x)
    assert ours.shape == theirs.shape == (2, 4, 10, 14)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    grads = [torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), [x, *up.parameters()])
             for y in (ours, theirs)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_the_time_mlps_as_one_matmul_are_each_blocks_own():
    """Unet.time_modulations against each ResNet block's own ResnetBlock.modulation; and a copy
    of the model (the EMA's) modulates its own blocks."""
    torch.manual_seed(0)
    model = Unet(8, dim_mults=(1, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    time = torch.tensor([0, 17, 49])
    joint = model.time_modulations(time)
    assert list(joint) == [m for m in model.modules() if isinstance(m, ResnetBlock)]
    for block, (gain, offset) in joint.items():
        own_gain, own_offset = block.modulation(model.time_mlp(time))
        assert torch.allclose(gain, own_gain, atol=1e-6) and torch.allclose(offset, own_offset, atol=1e-6)
    twin = copy.deepcopy(model)
    assert set(twin.time_modulations(time)) == {m for m in twin.modules() if isinstance(m, ResnetBlock)}
