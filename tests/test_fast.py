"""hw2/fast: every lever computes the homework's function, held against unet.py's own modules
(outputs and gradients, float32 and bf16), and the whole fast model against the starter's
numbers, in training and in sampling. (hw2/fast/README.md says what each lever buys.)"""
import copy
import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import unet
from conftest import ROOT, golden_cases, needs_golden
from diffusion import Diffusion
from hw2 import fast
from hw2.fast import kernel, layers, network
from hw2.fast.network import FastUnet
from hw2.fast.state import sampling_now
from hw2.precision import autocast
from hw2.sampling import generate


def perturbed(module, scale=0.2, seed=0):
    """module with every weight, bias and gain moved off its initial value (a missing gain shows)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def fast_copy(module, cls):
    """A copy of the homework's module with the fast class swapped in."""
    twin = copy.deepcopy(module)
    twin.__class__ = cls
    return twin


def outputs_and_grads(module, *inputs, dtype=None):
    """(output, [grad of a fixed weighting of it w.r.t. the first input and every parameter]).
    Under autocast the input comes in autocast's dtype, as the maps inside the network do (the
    norms pick their eps by it)."""
    x = inputs[0].detach().to(dtype or inputs[0].dtype).clone().requires_grad_()
    with autocast("cpu", dtype):
        y = module(x, *inputs[1:])
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    grads = torch.autograd.grad((y.float() * weights).sum(), [x, *module.parameters()])
    return y, grads


def assert_same_function(homework, ours, *inputs, dtype=None, atol=1e-5, rtol=1e-4):
    y0, g0 = outputs_and_grads(homework, *inputs, dtype=dtype)
    y1, g1 = outputs_and_grads(ours, *inputs, dtype=dtype)
    assert y0.shape == y1.shape and (dtype or y0.dtype == y1.dtype)  # under autocast bf16 may stay bf16
    assert torch.allclose(y0.float(), y1.float(), atol=atol, rtol=rtol), (y0.float() - y1.float()).abs().max()
    for (name, _), a, b in zip([("x", None), *homework.named_parameters()], g0, g1):
        scale = a.abs().max()
        assert (a.float() - b.float()).abs().max() <= rtol * 10 * scale + atol * 10, name


PRECISIONS = {"float32": (None, 1e-5, 1e-4), "bf16": (torch.bfloat16, 2e-2, 2e-2)}


# each lever against the homework's own module

@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_weight_standardization_is_the_homeworks(precision):
    dtype, atol, rtol = PRECISIONS[precision]
    homework = perturbed(unet.WeightStandardizedConv2d(6, 8, 3, padding=1))
    ours = fast_copy(homework, layers.WeightStandardizedConv2d)
    assert_same_function(homework, ours, torch.randn(2, 6, 9, 9), dtype=dtype, atol=atol, rtol=rtol)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_fused_layer_norm_is_the_homeworks_and_keeps_the_layout(precision, layout):
    dtype, atol, rtol = PRECISIONS[precision]
    homework = perturbed(unet.LayerNorm(16))
    ours = fast_copy(homework, layers.LayerNorm)
    x = (torch.randn(2, 16, 8, 8) * 3 + 1).contiguous(memory_format=layout)
    assert_same_function(homework, ours, x, dtype=dtype, atol=atol, rtol=rtol)
    assert ours(x).is_contiguous(memory_format=layout)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_time_modulation_inside_groupnorms_affine_is_the_homeworks(precision, layout):
    dtype, atol, rtol = PRECISIONS[precision]
    homework = perturbed(unet.Block(8, 16))
    ours = fast_copy(homework, layers.Block)
    x = torch.randn(3, 8, 8, 8).contiguous(memory_format=layout)
    scale_shift = (torch.randn(3, 16, 1, 1), torch.randn(3, 16, 1, 1))

    class WithTime(nn.Module):  # so that the gradients reach the scale and shift too
        def __init__(self, block):
            super().__init__()
            self.block = block
            self.scale, self.shift = (nn.Parameter(z.clone()) for z in scale_shift)

        def forward(self, x):
            return self.block(x, (self.scale, self.shift))

    assert_same_function(WithTime(homework), WithTime(ours), x, dtype=dtype, atol=atol, rtol=rtol)
    assert_same_function(homework, ours, x, dtype=dtype, atol=atol, rtol=rtol)  # block2: no time


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("channels,side", [(16, 32), (32, 16), (8, 8), (64, 4), (64, 8)])
def test_the_folded_linear_attention_is_the_homeworks(precision, channels, side):
    dtype, atol, rtol = PRECISIONS[precision]
    homework = perturbed(unet.LinearAttention(channels), seed=channels)
    ours = fast_copy(homework, layers.FoldedLinearAttention)
    assert_same_function(homework, ours, torch.randn(3, channels, side, side), dtype=dtype, atol=atol, rtol=rtol)


def pixels(x):
    """(B, C, H, W) -> (B, H*W, C), as folded() hands it to takes_base2()."""
    return x.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("channels,side,layout", [(16, 32, torch.channels_last), (32, 16, torch.contiguous_format)])
def test_sampling_takes_the_softmaxes_in_base_2_to_the_same_numbers(channels, side, layout, monkeypatch):
    monkeypatch.setattr(layers, "exp2_pays", lambda: True)  # as on a CPU with AVX-512 kernels
    homework = perturbed(unet.LinearAttention(channels), seed=channels)
    ours = fast_copy(homework, layers.Base2FoldedLinearAttention)
    taken, base2 = [], layers.FoldedLinearAttention.takes_base2
    monkeypatch.setattr(layers.FoldedLinearAttention, "takes_base2",
                        lambda self, x_t: taken.append(base2(self, x_t)) or taken[-1])
    x = torch.randn(3, channels, side, side).contiguous(memory_format=layout) * 2
    with torch.no_grad():
        ours(x)
    assert taken == [False]  # not without the sampling context
    with fast.sampling(ours):
        expected, folded = homework(x), ours(x)
    assert taken == [False, True]
    assert torch.allclose(expected, folded, atol=1e-5), (expected - folded).abs().max()


def test_softmaxes_beyond_the_exponent_bound_take_the_usual_way(monkeypatch):
    """Weights or inputs large enough for 2^z to overflow float32: the max is subtracted as usual
    (the bound is what keeps base 2 safe); so do bfloat16, NaNs and other devices."""
    monkeypatch.setattr(layers, "exp2_pays", lambda: True)  # as on a CPU with AVX-512 kernels
    homework = perturbed(unet.LinearAttention(16))
    with torch.no_grad():
        homework.to_qkv.weight.mul_(40)
    ours = fast_copy(homework, layers.Base2FoldedLinearAttention)
    x = torch.randn(2, 16, 32, 32) * 3
    with fast.sampling(ours):
        assert not ours.takes_base2(pixels(x))
        expected, folded = homework(x), ours(x)
        assert torch.isfinite(folded).all() and torch.allclose(expected, folded, atol=1e-4, rtol=1e-4)
        monkeypatch.setattr(layers.FoldedLinearAttention, "takes_base2", lambda self, x_t: True)  # were it taken
        assert not torch.isfinite(ours(x)).all()
    monkeypatch.undo()
    monkeypatch.setattr(layers, "exp2_pays", lambda: True)
    small = fast_copy(perturbed(unet.LinearAttention(16)), layers.Base2FoldedLinearAttention)
    x = torch.randn(2, 16, 32, 32)
    spike = x.clone()
    row = small.to_qkv.weight[0].flatten()
    spike[1, :, 7, 9] = 200 * row / row.norm()  # one pixel far out, along a row of W_q
    with fast.sampling(small):
        assert small.takes_base2(pixels(x)) and not small.takes_base2(pixels(spike))
        assert torch.allclose(small(spike), unet.LinearAttention.forward(small, spike), atol=1e-4, rtol=1e-4)
        assert not small.takes_base2(pixels(x).bfloat16())
        assert not small.takes_base2(pixels(x).index_fill(1, torch.tensor([5]), float("nan")))
        assert not small.takes_base2(pixels(x).to("meta"))
    assert not small.takes_base2(pixels(x))  # outside sampling


@pytest.mark.parametrize("capability,taken", [("AVX512", True), ("AVX512_BF16", True), ("AVX2", False),
                                              ("DEFAULT", False)])
def test_base_2_softmaxes_only_where_the_cpus_kernels_are_avx512(capability, taken, monkeypatch):
    """With AVX2 kernels torch's exp2 costs more than its exp (benchmarks/README.md: the lever lost
    7 % of the FID run there), so the softmaxes take the usual way, to the homework's numbers."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    homework = perturbed(unet.LinearAttention(16))
    ours = fast_copy(homework, layers.Base2FoldedLinearAttention)
    x = torch.randn(2, 16, 32, 32)
    with fast.sampling(ours):
        assert ours.takes_base2(pixels(x)) is taken
        assert torch.allclose(homework(x), ours(x), atol=1e-5)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_sub_pixel_upsample_is_the_homeworks(precision, layout):
    dtype, atol, rtol = PRECISIONS[precision]
    homework = perturbed(unet.Upsample(6, 4))
    assert layers.is_upsample(homework) and not layers.is_upsample(nn.Sequential(nn.Upsample(scale_factor=2)))
    ours = fast_copy(homework, layers.SubPixelUpsample)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    assert_same_function(homework, ours, x, dtype=dtype, atol=atol, rtol=rtol)
    assert ours(x).shape == (2, 4, 10, 14)


def stored_channels_last(model, x, t):
    """{block name: whether its output was stored channels-last (channels innermost)} for one pass."""
    seen, hooks = {}, []
    for name in ("init_conv", "downs.0.0", "downs.0.2.fn.norm", "downs.0.2", "downs.1.0", "mid_block1", "ups.2.3",
                 "ups.3.0", "final_res_block"):
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, y.stride(1) == 1)))
    model(x, t)
    for hook in hooks:
        hook.remove()
    return seen


def test_sampling_on_a_cpu_stores_the_large_maps_channels_last_and_nothing_else_does():
    homework, t = unet.Unet(8), torch.tensor([3, 9])
    model = fast.speed_up(copy.deepcopy(homework))
    x = torch.randn(2, 3, 32, 32)
    with fast.sampling(model):
        sampling = stored_channels_last(model, x, t)
    top = {"init_conv", "downs.0.0", "downs.0.2.fn.norm", "downs.0.2", "ups.2.3", "ups.3.0", "final_res_block"}
    assert {name for name, last in sampling.items() if last} == top  # 32 x 32 maps; 16 x 16 and below as usual
    assert not any(stored_channels_last(model, x, t).values())  # training: as usual
    with torch.no_grad():
        assert not any(stored_channels_last(model, x, t).values())  # no gradient is not sampling
    with fast.sampling(model):
        assert not any(stored_channels_last(model, torch.randn(2, 3, 16, 16), t).values())  # no map that large
        assert all(stored_channels_last(fast.speed_up(copy.deepcopy(homework), channels_last=True), x, t).values())
        assert not any(stored_channels_last(fast.speed_up(copy.deepcopy(homework), channels_last=False), x, t).values())


def test_channels_last_false_on_the_command_line_means_never():
    import main

    for argv, expected in (([], None), (["--channels_last"], True), (["--channels_last", "False"], False)):
        config, _ = main.parse_config(argv)
        model = main.build_unet(config)
        assert config.channels_last is expected and model.channels_last is expected
    assert not fast.is_fast(main.build_unet(main.parse_config(["--plain"])[0]))


def test_images_per_pass_by_device_precision_size_and_kernel(monkeypatch):
    """Twice the images on a CPU where the attention kernel runs (its temporaries are small);
    a plain model, or one without the lever, draws the homework's 64 at a time."""
    model = fast.speed_up(unet.Unet(8))
    monkeypatch.setattr(kernel, "_built", {"lib": None, "why": "no C compiler (cc) found"})
    assert fast.images_per_pass(model, "cpu", 32) == 32 and fast.images_per_pass(model, "cpu", 32, torch.bfloat16) == 64
    assert fast.images_per_pass(model, "cpu", 64) == 8 and fast.images_per_pass(model, "cpu", 256) == 1
    assert fast.images_per_pass(model, "cuda", 32, torch.float16) == fast.images_per_pass(model, "cuda", 64) == 256
    monkeypatch.setattr(kernel, "_built", {"lib": print, "why": None})
    assert fast.images_per_pass(model, "cpu", 32) == 64 and fast.images_per_pass(model, "cpu", 32, torch.bfloat16) == 128
    assert fast.images_per_pass(model, "cpu", 64) == 16 and fast.images_per_pass(model, "cpu", 30) == 36  # 900 px
    assert fast.images_per_pass(unet.Unet(8), "cpu", 32) == 64
    assert fast.images_per_pass(fast.speed_up(unet.Unet(8)), "cpu", 32, sized=False) == 64  # the run left it out


def test_generate_draws_in_passes_sized_for_its_images(monkeypatch):
    torch.manual_seed(0)
    d = Diffusion(fast.speed_up(unet.Unet(8, dim_mults=(1, 2))), image_size=64, timesteps=2)
    passes, real = [], Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample",
                        lambda self, n, **kw: passes.append((n, sampling_now())) or real(self, n, **kw))
    images = generate(d, 20, seed=0)
    per_pass = fast.images_per_pass(d.model, "cpu", 64)  # 8, or 16 where the attention kernel runs
    sizes = [per_pass] * (20 // per_pass) + [20 % per_pass]
    assert passes == [(n, True) for n in sizes] and images.shape == (20, 3, 64, 64)  # inside the sampling context
    assert not sampling_now()


def test_fused_adam_makes_the_homeworks_adam_step():
    torch.manual_seed(0)
    homework = unet.Unet(8, dim_mults=(1, 2))
    ours = fast.speed_up(copy.deepcopy(homework))
    opts = [fast.make_adam(m, 1e-3) for m in (homework, ours)]
    assert not opts[0].defaults.get("fused") and opts[1].defaults.get("fused")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 30])
    for _ in range(2):
        grads = torch.autograd.grad(homework(x, t).square().mean(), list(homework.parameters()))
        for model, opt in zip((homework, ours), opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()  # the same gradients for both: Adam magnifies the tiny ones' rounding
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(homework.named_parameters(), ours.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


A_BLOCK_OF_A_STEP = """
import ctypes, sys, torch
from hw2.fast.memory import keep_freed_memory

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


# the whole fast model

def golden_models(case, levers=fast.LEVERS):
    homework = unet.Unet(dim=case["dim"], dim_mults=tuple(case["dim_mults"]))
    homework.load_state_dict(case["state_dict"], strict=True)
    return homework.eval(), fast.speed_up(copy.deepcopy(homework), levers).eval()


@needs_golden
def test_the_fast_model_gives_the_starters_outputs_and_the_homeworks_gradients():
    for case in golden_cases():
        homework, ours = golden_models(case)
        assert ours.state_dict().keys() == homework.state_dict().keys()
        with fast.sampling(ours):
            y = ours(case["x"], case["t"])
        assert (y - case["y"]).abs().max() < 1e-5, (case["dim"], (y - case["y"]).abs().max())
        assert_same_function(homework, ours, case["x"], case["t"])  # training: outputs and every gradient


@needs_golden
def test_under_bf16_the_fast_model_stays_as_close_to_the_starter_as_the_homeworks():
    """bf16 rounds differently on the two paths; each stays as near the starter's float32
    numbers as the other does."""
    for case in golden_cases():
        homework, ours = golden_models(case)
        with torch.no_grad(), autocast("cpu", torch.bfloat16):
            theirs = (homework(case["x"], case["t"]).float() - case["y"]).abs().mean()
        with fast.sampling(ours), autocast("cpu", torch.bfloat16):
            mine = (ours(case["x"], case["t"]).float() - case["y"]).abs().mean()
        assert mine < 1.5 * theirs + 1e-3, (mine, theirs)


@needs_golden
@pytest.mark.parametrize("lever", fast.LEVERS)
def test_without_any_one_lever_the_model_is_still_the_starters(lever):
    case = golden_cases()[0]
    _, ours = golden_models(case, [x for x in fast.LEVERS if x != lever])
    with fast.sampling(ours):
        y = ours(case["x"], case["t"])
    assert (y - case["y"]).abs().max() < 1e-5


def fast_classes(model):
    return {type(m) for m in model.modules()} - {type(m) for m in unet.Unet(8, dim_mults=(1, 2)).modules()}


@pytest.mark.parametrize("lever,classes,alone", [
    ("fused_norms", {layers.WeightStandardizedConv2d, layers.LayerNorm}, None),
    ("folded_attention", {layers.Base2FoldedLinearAttention, layers.Residual},  # base 2 builds on it
     {layers.FoldedLinearAttention, layers.Residual}),
    ("base2_softmax", {layers.Base2FoldedLinearAttention}, set()),  # not without the folded attention
    ("attention_kernel", {layers.KernelPreNorm}, None), ("modulation_in_norm", {layers.Block}, None),
    ("sub_pixel_upsample", {layers.SubPixelUpsample}, None), ("channels_last", set(), {FastUnet}),
    ("captured_sampling", set(), {FastUnet}), ("pass_size", set(), None), ("fused_adam", set(), None)])
def test_speed_up_swaps_in_each_lever_it_is_given_and_no_other(lever, classes, alone):
    every = fast_classes(fast.speed_up(unet.Unet(8, dim_mults=(1, 2))))
    without = fast_classes(fast.speed_up(unet.Unet(8, dim_mults=(1, 2)), [x for x in fast.LEVERS if x != lever]))
    assert every - without == classes
    model = fast.speed_up(unet.Unet(8, dim_mults=(1, 2)))
    assert type(model) is FastUnet and model.levers == set(network.NETWORK_LEVERS)  # the run's levers are not its
    single = fast.speed_up(unet.Unet(8, dim_mults=(1, 2)), [lever])
    assert fast_classes(single) == (classes if alone is None else alone)


def test_speed_up_takes_a_fresh_network_and_copies_keep_their_classes():
    model = fast.speed_up(unet.Unet(8, dim_mults=(1, 2)))
    twin = copy.deepcopy(model)
    assert type(twin) is FastUnet and twin.levers == model.levers
    with pytest.raises(ValueError, match="not one already made fast"):
        fast.speed_up(model)
    with pytest.raises(ValueError, match="unknown levers: warp_drive"):
        fast.speed_up(unet.Unet(8, dim_mults=(1, 2)), ["warp_drive"])


def test_a_lever_that_changed_the_parameters_or_state_dict_is_refused_at_run_time(monkeypatch):
    class BlockWithAnExtraKey(layers.Block):
        def _save_to_state_dict(self, destination, prefix, keep_vars):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "extra"] = torch.zeros(())

    monkeypatch.setattr(network, "TABLE", (network.Lever("modulation_in_norm", BlockWithAnExtraKey, (unet.Block,)),))
    with pytest.raises(RuntimeError, match="a speed lever changed the U-Net's parameters or state_dict keys"):
        fast.speed_up(unet.Unet(8, dim_mults=(1, 2)))


def test_every_lever_was_checked_against_unet_py_as_it_is():
    """unet.py's code changed (not its prose): renew network.SHIPPED, once the levers' tests pass
    against the new code, with the fingerprints this message gives."""
    now = {name: network.fingerprint(getattr(unet, name)) for name in network.SHIPPED}
    assert network.edited() == (), "renew hw2/fast/network.py's SHIPPED: " + repr(now)
    assert now == network.SHIPPED
    covered = {d.__name__ for row in network.TABLE for d in row.covers}
    assert covered == set(network.SHIPPED)  # every definition a lever stands in for has its fingerprint


def test_sampling_through_the_fast_model_draws_the_homeworks_images():
    torch.manual_seed(0)
    homework = Diffusion(perturbed(unet.Unet(8, dim_mults=(1, 2)), scale=0.05), image_size=16, timesteps=6)
    ours = homework.with_model(fast.speed_up(copy.deepcopy(homework.model)))
    a = generate(homework, 3, seed=5)
    b = generate(ours, 3, seed=5)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_unet_py_is_the_homeworks_network_alone():
    """It imports nothing of hw2 and checks no device, memory layout or gradient mode."""
    source = (ROOT / "unet.py").read_text()
    for word in ("import hw2", "from hw2", "is_grad_enabled", "inference_mode", ".device.type", "memory_format"):
        assert word not in source, word


def test_no_file_outside_hw2_fast_names_a_lever():
    files = [ROOT / name for name in ("main.py", "trainer.py", "diffusion.py", "unet.py")]
    files += [p for p in (ROOT / "hw2").glob("*.py")]
    for path in files:
        source = path.read_text()
        for lever in fast.LEVERS:
            if path.name == "config.py" and lever == "channels_last":
                continue  # the flag that chooses it
            assert lever not in source, (path.name, lever)
        assert "is_grad_enabled" not in source, path.name


# checkpoints are the same either way

@pytest.mark.parametrize("first,then", [("--plain", None), (None, "--plain")])
def test_a_run_trained_one_way_resumes_the_other_way_to_the_same_losses(image_root, tmp_path, first, then):
    import main

    base = ["--data_path", str(image_root), "--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2",
            "--time_steps", "10", "--batch_size", "4", "--save_and_sample_every", "2", "--num_samples", "2",
            "--amp", "off", "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main.main([*base, "--save_folder", str(one), "--train_steps", "4"] + ([first] if first else [])) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "2"] + ([first] if first else [])) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "4", "--load_path", str(two)]
                     + ([then] if then else [])) == 0
    losses = [[float(row.split(",")[1]) for row in Path(folder, "metrics.csv").read_text().splitlines()[1:]]
              for folder in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    # main() called in-process leaves the process-wide settings alone: only `python main.py` makes them
    assert "freed_memory" not in fast._process and not torch.backends.cudnn.benchmark
