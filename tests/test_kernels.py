"""The compiled linear attention (hw2/fast/kernel.py): the same numbers as the homework's
PreNorm(LinearAttention), taken only while sampling on a CPU, and built once per machine, or
cleanly not at all."""
import copy
import os
import stat

import pytest
import torch

from conftest import golden_cases, needs_golden
from hw2 import fast
from hw2.fast import kernel, layers
from hw2.precision import autocast
from unet import LinearAttention, PreNorm, Unet

needs_kernel = pytest.mark.skipif(kernel.kernel() is None, reason=f"the kernel is not built here: {kernel.status()}")


def perturbed_attention(channels, scale=0.2, seed=0, heads=4):
    """(the homework's PreNorm(LinearAttention) as the U-Net holds it, every weight, bias and gain
    moved off its start; the same block with the kernel swapped in)."""
    torch.manual_seed(seed)
    homework = PreNorm(channels, LinearAttention(channels, heads=heads))
    with torch.no_grad():
        for p in homework.parameters():
            p.add_(torch.randn_like(p) * scale)
    block = copy.deepcopy(homework)
    block.__class__ = layers.KernelPreNorm
    block.fn.__class__ = layers.FoldedLinearAttention
    return homework, block


@pytest.fixture
def spy(monkeypatch):
    """The batch sizes the kernel was called with, in order."""
    calls, run = [], kernel.linear_attention
    monkeypatch.setattr(kernel, "linear_attention", lambda x_t, *w: calls.append(x_t.shape[0]) or run(x_t, *w))
    return calls


@needs_kernel
@pytest.mark.parametrize("channels,side,layout,batch", [
    (16, 32, torch.channels_last, 3), (16, 32, torch.contiguous_format, 1), (32, 16, torch.contiguous_format, 5),
    (64, 16, torch.channels_last, 2), (128, 16, torch.contiguous_format, 1), (16, 12, torch.channels_last, 2)])
def test_the_kernel_computes_the_homeworks_attention_block(channels, side, layout, batch, spy):
    """The homework's module is the oracle, for every channel count the kernel is built for, both
    layouts, pixel counts of 1, 9 and 64 vectors."""
    homework, block = perturbed_attention(channels, seed=channels + side)
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=layout) * 2
    with fast.sampling(block):
        expected, compiled = homework(x), block(x)
    assert spy == [batch]
    assert compiled.dtype == torch.float32 and compiled.shape == expected.shape
    assert torch.allclose(expected, compiled, atol=2e-5, rtol=1e-4), (expected - compiled).abs().max()


@needs_kernel
def test_the_kernels_exponential_is_float32_exact_to_a_few_ulp():
    """Its 2^z (a rounding and a Taylor series) against float64's, from 0 down to the flush at -126."""
    z = torch.cat([torch.linspace(-126, 0, 16 * 4096), -torch.rand(16 * 1024) * 2, torch.zeros(16)])
    out = torch.empty_like(z)
    kernel.kernel().hw2_exp2(z.data_ptr(), out.data_ptr(), z.numel())
    exact = torch.exp2(z.double())
    assert ((out.double() - exact) / exact).abs().max() < 3e-7


@needs_kernel
def test_a_shape_it_is_not_built_for_is_refused_in_words():
    w, g = torch.zeros(128, 16), torch.ones(16)
    with pytest.raises(ValueError, match="does not take 16 channels and 36 pixels"):
        kernel.linear_attention(torch.zeros(1, 36, 16), g, w, w, w, torch.zeros(16, 128), torch.zeros(16), g, 1e-5)


@needs_kernel
def test_large_exponents_stay_exact_and_a_nan_stays_in_its_image(spy):
    """Every softmax subtracts its maximum: weights 40x larger (exponents in the hundreds, where
    2^z overflows float32 without it) give the same numbers. A NaN pixel makes its own image's
    output NaN, as torch's softmax does, and leaves the others' alone."""
    homework, block = perturbed_attention(16)
    with torch.no_grad():
        block.fn.to_qkv.weight.mul_(40)
        homework.fn.to_qkv.weight.mul_(40)
    x = torch.randn(3, 16, 32, 32) * 3
    with fast.sampling(block):
        expected, compiled = homework(x), block(x)
        assert torch.isfinite(compiled).all() and torch.allclose(expected, compiled, atol=1e-4, rtol=1e-4)
        x[1, 4, 20, 3] = float("nan")
        poisoned = block(x)
    assert spy == [3, 3]
    assert poisoned[1].isnan().all()
    assert torch.equal(poisoned[0], compiled[0]) and torch.equal(poisoned[2], compiled[2])


@needs_kernel
def test_the_threads_split_images_not_sums():
    """One thread or two, the same bits: each image is computed whole by one thread."""
    _, block = perturbed_attention(16)
    x = torch.randn(5, 16, 32, 32)
    threads = torch.get_num_threads()
    try:
        with fast.sampling(block):
            torch.set_num_threads(1)
            one = block(x)
            torch.set_num_threads(max(2, threads))
            two = block(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@needs_kernel
def test_taken_only_while_sampling_on_a_cpu_in_the_shapes_it_is_built_for(spy, monkeypatch):
    """Not outside the sampling context (in training gradients go through torch; without a
    gradient but not sampling, neither), not for other head sizes, pixel counts that are not
    whole vectors, or maps where the direct form is the faster (H*W <= C). Under bfloat16
    autocast it computes in float32 from the bfloat16 maps, with the norms' bfloat16 eps (1e-3:
    with the output conv quieted, the norm after it sees a variance near eps, where the choice
    moves the output tenfold), and rounds once at the end."""
    homework, block = perturbed_attention(16)
    x = torch.randn(2, 16, 32, 32)
    assert block(x).requires_grad and spy == []
    with torch.no_grad():
        block(x)
    with fast.sampling(block):
        block(torch.randn(2, 16, 6, 6))
        perturbed_attention(16, heads=2)[1](x)
        block(torch.randn(2, 16, 4, 4))
        assert spy == []
        for b in (block, homework):
            b.fn.to_out[0].bias.zero_()
            b.fn.to_out[0].weight.mul_(0.1)
        with autocast("cpu", torch.bfloat16):
            half = block(x.bfloat16())
    with torch.no_grad():
        expected = homework.double()(x.bfloat16().double()).float()  # the homework's eps off float32: 1e-3
    assert spy == [2] and half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), expected, atol=1e-6, rtol=2e-2), (half.float() - expected).abs().max()
    assert not kernel.takes(x.to("meta"), block.fn)


@needs_golden
@needs_kernel
def test_the_starters_weights_give_the_starters_outputs_through_the_kernel(spy):
    """The starter's own numbers (golden.pt), with the top levels' attention in the kernel."""
    for case in golden_cases():
        model = Unet(dim=case["dim"], dim_mults=tuple(case["dim_mults"]))
        model.load_state_dict(case["state_dict"], strict=True)
        fast.speed_up(model.eval())
        before = len(spy)
        with fast.sampling(model):
            y = model(case["x"], case["t"])
        assert len(spy) > before
        assert (y - case["y"]).abs().max() < 1e-5, (case["dim"], (y - case["y"]).abs().max())


def fake_compiler(folder, body):
    """An executable `cc` in folder that runs the shell commands in body (and logs its calls)."""
    path = folder / "cc"
    path.write_text(f"#!/bin/sh\necho called >> {folder / 'calls'}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.skipif(os.name != "posix", reason="the fake compilers are shell scripts")
def test_building_is_cached_and_every_failure_is_a_reason_not_a_traceback(tmp_path, monkeypatch):
    """Built once per source, flags, compiler and CPU, into XDG_CACHE_HOME; without a compiler, with
    one that fails, or with HW2_NO_KERNELS=1, build() says why and sampling stays with torch."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HW2_NO_KERNELS", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    assert kernel.build() == (None, "no C compiler (cc) found")

    failing = fake_compiler(tmp_path, 'echo "linear_attention.c:1:1: error: no such luck" >&2\nexit 1')
    monkeypatch.setenv("CC", str(failing))
    lib, why = kernel.build()
    assert lib is None and why == "cc could not build it: linear_attention.c:1:1: error: no such luck"
    assert not list((tmp_path / "cache" / "hw2-ddpm").glob("*.so"))  # nothing half-built left behind

    real = tmp_path / "real"
    real.mkdir()
    compiler = fake_compiler(real, f'exec {os.environ.get("CC_FOR_TESTS", "cc")} "$@"')
    monkeypatch.setenv("CC", str(compiler))
    lib, why = kernel.build()
    if lib is None:
        pytest.skip(f"no working C compiler here: {why}")
    assert kernel.build()[0] is not None
    assert (real / "calls").read_text().count("called") == 1  # the second build found the first
    assert len(list((tmp_path / "cache" / "hw2-ddpm").glob("linear_attention-*.so"))) == 1
    monkeypatch.setattr(kernel, "cpu_identity", lambda: "another CPU")
    assert kernel.build()[0] is not None
    assert (real / "calls").read_text().count("called") == 2  # never another CPU's build

    monkeypatch.setenv("HW2_NO_KERNELS", "1")
    assert kernel.build() == (None, "HW2_NO_KERNELS is set")


def test_without_the_kernel_sampling_runs_on_torch(monkeypatch, spy):
    monkeypatch.setattr(kernel, "_built", {"lib": None, "why": "no C compiler (cc) found"})
    homework, block = perturbed_attention(16)
    x = torch.randn(2, 16, 32, 32)
    with fast.sampling(block):
        assert torch.allclose(block(x), homework(x), atol=2e-5, rtol=1e-4)
    assert spy == []
    assert kernel.status() == "no compiled kernel (no C compiler (cc) found)"
