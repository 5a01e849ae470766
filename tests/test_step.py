"""The training step's one home (hw2/step.py): the Trainer's results are bitwise those of the loop
it replaced, the joined pass is the same step in other arithmetic, and the CUDA levers' plan."""
import dataclasses
import math

import pytest
import torch

from diffusion import Diffusion
from hw2 import fast
from hw2.config import Config
from hw2.data import Batches, training_data
from hw2.distributed import Processes
from hw2.fast import cuda, step as fast_step
from hw2.precision import autocast
from hw2.step import TrainStep
from trainer import Trainer
from unet import Unet


class LoopBeforeTheStep:
    """The oracle: Trainer.train_step as it was written before the step had a home of its own
    (commit 5e5cea2), for one process: per pass, the batch, t and noise, forward, backward;
    the loss read and checked; then Adam."""

    def __init__(self, diffusion, config, images):
        self.diffusion, self.model, self.config = diffusion, diffusion.model, config
        self.batches = Batches(images, config.image_size, config.batch_size, seed=config.seed)
        self.opt = fast.make_adam(self.model, config.learning_rate)

    def train_step(self):
        self.model.train()
        accumulate = self.config.gradient_accumulate_every
        total = torch.zeros(())
        for _ in range(accumulate):
            x_0 = Batches.to_model(next(self.batches), "cpu")
            t = torch.randint(0, self.diffusion.num_timesteps, (x_0.shape[0],))
            noise = torch.randn(x_0.shape)
            loss = self.diffusion(x_0, noise=noise, t=t) / accumulate
            loss.backward()
            total += loss.detach()
        loss = total.item()
        assert math.isfinite(loss)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def build(config):
    torch.manual_seed(config.seed)
    model = fast.for_run(Unet(config.unet_dim, dim_mults=config.unet_dim_mults), config)
    return Diffusion(model, image_size=config.image_size, timesteps=config.time_steps)


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "fast"])
def test_ten_steps_with_accumulation_are_bitwise_those_of_the_loop_before(tiny_config, plain):
    """The same arithmetic in the same order, so the same bits: losses and every weight."""
    config = dataclasses.replace(tiny_config, gradient_accumulate_every=2, plain=plain, amp="off")
    _, images = training_data(config, progress=False)
    trainer = Trainer(build(config), config, images)
    oracle = LoopBeforeTheStep(build(config), config, images)
    torch.manual_seed(1)
    ours = [trainer.train_step() for _ in range(10)]
    torch.manual_seed(1)
    theirs = [oracle.train_step() for _ in range(10)]
    assert ours == theirs
    mine, before = trainer.model.state_dict(), oracle.model.state_dict()
    assert all(torch.equal(mine[k], before[k]) for k in before)


def test_the_joined_pass_is_the_same_step_in_other_arithmetic(tiny_config):
    """One pass of 2B images against two of B: the same draws, so the same loss and update up to
    float32 rounding (after one Adam step, where no rounding is amplified), and the same
    random stream afterwards."""
    config = dataclasses.replace(tiny_config, gradient_accumulate_every=2, batch_size=4)
    steps, losses, states = [], [], []
    for joined in (False, True):
        diffusion = build(config)
        step = TrainStep(diffusion, torch.optim.SGD(diffusion.model.parameters(), lr=0.1), batch_size=4, passes=2)
        step.joined = joined
        step.inputs.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
        torch.manual_seed(2)
        losses.append(step().item())
        states.append(diffusion.model.state_dict())
        steps.append(torch.rand(()))  # what the generator gives next
    assert steps[0] == steps[1]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in states[0]:  # SGD at lr 0.1: a gradient's rounding error times 0.1
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=1e-6)


def test_the_step_draws_t_and_noise_in_pass_order_from_the_default_generator(tiny_config):
    diffusion = build(tiny_config)
    step = TrainStep(diffusion, torch.optim.SGD(diffusion.model.parameters(), lr=0.1), batch_size=4, passes=2)
    torch.manual_seed(5)
    draws = step.draw()
    torch.manual_seed(5)
    for t, noise in draws:
        assert torch.equal(t, torch.randint(0, tiny_config.time_steps, (4,)))
        assert torch.equal(noise, torch.randn(4, 3, 16, 16))


def test_the_step_leaves_its_loss_on_the_device_and_reads_only_its_buffers(tiny_config):
    """Everything the step computes from comes from `inputs`: the same buffers, the same loss."""
    diffusion = build(tiny_config)
    step = TrainStep(diffusion, torch.optim.SGD(diffusion.model.parameters(), lr=0.0), batch_size=4, passes=1)
    step.load([torch.full((4, 3, 16, 16), 255, dtype=torch.uint8)])
    assert torch.equal(step.inputs, torch.ones_like(step.inputs))  # uint8 255 -> 1.0, as the model takes it
    torch.manual_seed(0)
    loss = step()
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    torch.manual_seed(0)
    t, noise = step.draw()[0]
    with autocast("cpu", None):
        expected = diffusion(torch.ones(4, 3, 16, 16), noise=noise, t=t)
    assert loss.item() == expected.item()


class Alone(Processes):
    pass


class Several(Processes):
    distributed = True


@pytest.mark.parametrize("device,dtype,procs,overrides,expected", [
    ("cuda", None, Alone(), {}, (True, None)),
    ("cuda", torch.bfloat16, Alone(), {}, (True, None)),
    ("cuda", torch.float16, Alone(), {}, (False, "float16's dynamic loss scaling")),
    ("cuda", None, Several(), {}, (False, "several processes")),
    ("cuda", None, Alone(), {"plain": True}, (False, "--plain")),
    ("cuda", None, Alone(), {"cuda_graph": False}, (False, "--cuda_graph False")),
    ("cpu", None, Alone(), {}, (False, "no CUDA graphs on cpu")),
    ("mps", None, Alone(), {}, (False, "no CUDA graphs on mps")),
    ("cuda", None, Alone(), {"edited": ("unet.py",)},
     (False, "unet.py was edited, so the model's Python (a print, a counter) runs at every step; --cuda_graph True "
             "captures it, and then that Python runs only while it is captured")),
    ("cuda", None, Alone(), {"edited": ("unet.py", "diffusion.py"), "cuda_graph": True}, (True, None)),
    ("cuda", None, Alone(), {"edited": ("diffusion.py",), "cuda_graph": False}, (False, "--cuda_graph False")),
    ("cuda", None, Alone(), {"lacking": "torch 2.3 has no torch.cuda.graph"}, (False, "torch 2.3 has no torch.cuda.graph")),
])
def test_the_step_is_captured_wherever_a_capture_holds_and_says_why_not(device, dtype, procs, overrides, expected,
                                                                       monkeypatch):
    """The plan, and the start-up line's words; "edited": unet.py or diffusion.py changed, which keeps
    the captures off unless --cuda_graph True; "lacking": what this torch would lack for a capture."""
    overrides = dict(overrides)
    edited, lacking = overrides.pop("edited", ()), overrides.pop("lacking", None)
    monkeypatch.setattr(fast_step, "edited_files", lambda: edited)
    monkeypatch.setattr(cuda.Cuda, "unsupported", lambda self: lacking)
    assert fast_step.plan(device, dtype, procs, Config(**overrides)) == expected
    words = fast_step.describe(device, dtype, procs, Config(**overrides))
    if device != "cuda":
        assert words is None
    else:
        assert words == ("the training step in one CUDA graph, checked at first use" if expected[0] else
                         f"the training step eager ({expected[1]})")


@pytest.mark.parametrize("amp,plain,accumulate,size,batch,joined", [
    ("off", False, 2, 16, 4, False),  # float32's larger pass is slower on a CPU
    ("bf16", False, 2, 16, 4, True),
    ("bf16", True, 2, 16, 4, False),  # --plain: no lever
    ("bf16", False, 1, 16, 4, False),  # one pass: nothing to join
    ("bf16", False, 2, 32, 32, True),  # the homework's 2 x 32 images of 32 px: CPU_JOIN_PIXELS exactly
    ("bf16", False, 2, 32, 33, False),  # one image more
    ("bf16", False, 2, 64, 32, False),  # 2 x 32 images of 64 px: four times the homework's pixels
])
def test_on_a_cpu_the_trainer_calls_the_step_itself_joined_only_under_bf16(tiny_config, amp, plain, accumulate,
                                                                           size, batch, joined):
    config = dataclasses.replace(tiny_config, amp=amp, plain=plain, gradient_accumulate_every=accumulate,
                                 image_size=size, batch_size=batch)
    diffusion = build(config)
    step = TrainStep(diffusion, torch.optim.SGD(diffusion.model.parameters(), lr=0.1), batch_size=config.batch_size,
                     passes=accumulate, amp_dtype=torch.bfloat16 if amp == "bf16" else None)
    assert fast.step_for_trainer(step, config) is step and step.joined is joined


def test_on_a_cpu_the_trainer_builds_a_plain_adam(tiny_config):
    _, images = training_data(tiny_config, progress=False)
    trainer = Trainer(build(tiny_config), tiny_config, images)
    assert isinstance(trainer.one_step, TrainStep) and not trainer.opt.defaults.get("capturable")
