"""The path every run on a CUDA GPU takes, run on a CPU through the fake CUDA device
(hw2/fast/fake_cuda.py): the captured training step (hw2/fast/step.py) as the Trainer calls
it (the watched warm-up step, the first-use comparison, the fallback after a failed capture),
and captured sampling (hw2/fast/replay.py). The command line's side is tests/test_capture_runs.py."""
import dataclasses
import re

import pytest
import torch

from diffusion import Diffusion
from hw2 import fast, precision
from hw2.errors import UserError
from hw2.fast import cuda, replay
from hw2.fast.fake_cuda import FakeCuda
from hw2.fast.step import WARMUP_STEPS, CudaStep
from hw2.fast.watch import TOLERANCE
from hw2.data import training_data
from hw2.sampling import generate
from hw2.step import TrainStep
from trainer import Trainer
from unet import Unet

CUDA_LEVERS = tuple(x for x in fast.LEVERS if x not in fast.CPU_LEVERS)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())  # each test sees its notes
    with cuda.use(FakeCuda()) as device:
        yield device


@pytest.fixture
def config(tiny_config):
    """Two passes a step, float32 (as --amp auto on CUDA)."""
    return dataclasses.replace(tiny_config, gradient_accumulate_every=2, amp="off")


def trainer_for(config, amp_dtype=None):
    torch.manual_seed(config.seed)
    model = fast.for_run(Unet(config.unet_dim, dim_mults=config.unet_dim_mults), config)
    diffusion = Diffusion(model, image_size=config.image_size, timesteps=config.time_steps)
    _, images = training_data(config, progress=False)
    return Trainer(diffusion, config, images, amp_dtype=amp_dtype)


def state(trainer):
    """Everything a step changes: weights, the optimizer's state, the generator's state."""
    opt = trainer.opt.state_dict()["state"]
    return ({k: v.clone() for k, v in trainer.model.state_dict().items()},
            {(i, k): v.clone() for i, s in opt.items() for k, v in s.items()}, torch.get_rng_state())


def assert_same_state(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a[2], b[2])


def eager_run(config, steps, edit=None, seed=None):
    """(losses, state) of `steps` steps of the same run with --cuda_graph False, after edit(trainer)
    (and torch.manual_seed(seed), where given)."""
    trainer = trainer_for(dataclasses.replace(config, cuda_graph=False))
    if edit:
        edit(trainer)
    if seed is not None:
        torch.manual_seed(seed)
    return [trainer.train_step() for _ in range(steps)], state(trainer)


def test_the_trainer_warms_up_then_captures_once_checks_it_and_replays(config, fake):
    trainer = trainer_for(config)
    step = trainer.one_step
    assert isinstance(step, CudaStep) and step.capture
    assert trainer.opt.param_groups[0]["capturable"] and trainer.opt.param_groups[0]["fused"]
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    assert (fake.side_streams, fake.captures, step.graph) == (WARMUP_STEPS, 0, None)
    for k in range(5):
        trainer.train_step()
        assert (fake.captures, fake.replays) == (1, k + 1)
    assert step.failed is None and step.agreement == 0.0  # the fake replays the eager step's arithmetic
    assert step.path() == ("the training step captured in a CUDA graph after 3 eager warm-up steps; its first replay "
                           "agreed with an eager step from the same state to 0.0e+00 (tolerance 1e-03)")


def test_captured_losses_and_weights_are_those_of_the_eager_step(config, fake):
    """The captured step computes what the eager step computes, bit for bit, through the fake
    (whose replays run the recorded operators, not the step's Python); each loss returned is
    the caller's to keep (a later replay does not overwrite it)."""
    captured = trainer_for(config)
    kept = []
    torch.manual_seed(1)
    for _ in range(8):
        captured.model.train()
        captured.one_step.load(next(captured.batches) for _ in range(2))
        loss = captured.one_step()
        kept.append((loss, loss.item()))
    assert all(tensor.item() == value for tensor, value in kept)
    after = state(captured)
    eager_losses, eager_after = eager_run(config, 8, seed=1)
    assert [v for _, v in kept] == eager_losses
    assert_same_state(after, eager_after)
    assert fake.captures == 1 and fake.replays == 8 - WARMUP_STEPS


def test_a_replay_runs_the_recorded_work_and_not_the_steps_python(config, fake):
    """As on a GPU: Python in the model (a counter here) runs for the eager steps and the capture,
    never at a replay, while the replays go on computing."""
    trainer = trainer_for(config)
    calls = []
    trainer.model.final_conv.register_forward_hook(lambda module, args, out: calls.append(1))
    losses = [trainer.train_step() for _ in range(WARMUP_STEPS + 6)]
    # the warm-up steps (the first in two passes, before the join), the compared eager step, the capture
    assert len(calls) == WARMUP_STEPS + 3
    assert len(set(losses[WARMUP_STEPS:])) > 1


@pytest.mark.parametrize("overrides,amp_dtype,why", [
    ({"cuda_graph": False}, None, "--cuda_graph False"),
    ({}, torch.float16, "float16's dynamic loss scaling"),
])
def test_no_capture_where_the_plan_says_no(config, fake, overrides, amp_dtype, why):
    config = dataclasses.replace(config, **overrides)
    assert fast.step_plan("cpu", amp_dtype, None, config) == (False, why)
    trainer = trainer_for(config, amp_dtype=amp_dtype)
    for _ in range(WARMUP_STEPS + 3):
        trainer.train_step()
    assert fake.captures == 0 and trainer.one_step.graph is None
    assert not trainer.opt.param_groups[0]["capturable"]


def test_plain_runs_the_step_itself(config, fake):
    trainer = trainer_for(dataclasses.replace(config, plain=True))
    assert isinstance(trainer.one_step, TrainStep)


@pytest.mark.parametrize("free_passes,joined", [(4, True), (3, False), (1, False)])
def test_the_passes_are_joined_where_half_the_free_memory_holds_them_all(config, fake, free_passes, joined):
    """Two passes: joined where both fit in half the free memory; not where it holds one pass but not both."""
    fake.pass_bytes, fake.free = 1000, free_passes * 1000
    trainer = trainer_for(config)
    assert not trainer.one_step.step.joined
    trainer.train_step()
    assert trainer.one_step.step.joined is joined


class HostRead:
    """A gradient hook that reads a value on the host, as an edited layer might (`when`: only while
    the fake captures, which the watched step cannot see)."""

    def __init__(self, when=lambda: True):
        self.when = when

    def __call__(self, grad):
        if self.when():
            grad.sum().item()  # the line the notes name


HOST_READ_LINE = HostRead.__call__.__code__.co_firstlineno + 2


def host_read_in_backward(trainer):
    trainer.model.final_conv.weight.register_hook(HostRead())


def adam_not_capturable(trainer):
    """What a plain Adam's state_dict loaded with its settings once made of a run's optimizer: its step
    reads its step count on the host."""
    trainer.opt = trainer.one_step.step.opt = torch.optim.Adam(trainer.model.parameters(), lr=1e-3, foreach=True)


def generator_of_its_own(trainer):
    generator = torch.Generator().manual_seed(0)
    trainer.model.final_conv.register_forward_hook(
        lambda module, args, out: out + 1e-3 * torch.randn(out.shape, generator=generator))


@pytest.mark.parametrize("edit,found", [
    (host_read_in_backward, f"a value read on the host at tests/test_capture.py:{HOST_READ_LINE}"),
    (adam_not_capturable, "a value read on the host (.item()) at hw2/step.py:"),
    (generator_of_its_own, "a random draw from a generator of its own (a graph advances only the device's default "
                           "one) at diffusion.py:"),
], ids=["host read in backward", "Adam not capturable", "generator of its own"])
def test_what_the_watched_step_finds_keeps_the_step_eager_and_no_capture_is_tried(config, fake, capsys, edit, found):
    """The last warm-up step runs under watch: what it finds keeps the step eager (no capture is
    tried), with one note naming it and its line, and the run computes what an eager run does."""
    trainer = trainer_for(config)
    edit(trainer)
    losses = [trainer.train_step() for _ in range(WARMUP_STEPS + 3)]
    assert fake.captures == 0 and not trainer.one_step.capture
    eager_losses, eager_after = eager_run(config, WARMUP_STEPS + 3, edit)
    assert losses == eager_losses
    assert_same_state(state(trainer), eager_after)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(
        f"note: the training step runs eagerly, not in a CUDA graph: a graph cannot hold {found}")
    assert trainer.one_step.path().startswith(f"the training step eager (a graph cannot hold {found}")


def read_in_backward_while_capturing(trainer, fake):
    trainer.model.final_conv.weight.register_hook(HostRead(when=lambda: fake.in_capture))


def read_after_the_update_while_capturing(trainer, fake):
    """The read after Adam updated the weights and its moments and counted the step up."""
    read = HostRead(when=lambda: fake.in_capture)
    trainer.opt.register_step_post_hook(lambda opt, args, kwargs: read(trainer.model.final_conv.weight))


@pytest.mark.parametrize("where", [read_in_backward_while_capturing, read_after_the_update_while_capturing],
                         ids=["in backward", "after the optimizer's update"])
def test_a_capture_that_fails_all_the_same_goes_on_from_the_eager_steps_result(config, fake, capsys, where):
    """A read the watch cannot see (it happens in the capture only): the capture fails, the device
    recovered (as torch 2.14 does, by its source), and the run goes on from the eager step made
    before the capture: the losses, weights, optimizer state and generator an eager run has."""
    trainer = trainer_for(config)
    edit = lambda t: where(t, fake)  # noqa: E731
    edit(trainer)
    losses = [trainer.train_step() for _ in range(WARMUP_STEPS + 3)]
    eager_losses, eager_after = eager_run(config, WARMUP_STEPS + 3, edit)
    assert losses == eager_losses
    assert_same_state(state(trainer), eager_after)
    assert fake.captures == 1 and trainer.one_step.graph is None
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and re.fullmatch(
        rf"note: the training step runs eagerly, not in a CUDA graph: its capture failed \(RuntimeError at "
        rf"tests/test_capture.py:{HOST_READ_LINE}: a value read on the host( \(\.item\(\)\))?: operation not "
        rf"permitted when stream is capturing \(the fake CUDA device refuses it as CUDA would\)\)", notes[0]), notes


@pytest.mark.parametrize("device,every,way_on", [
    (dict(recovers=False), 100, r"nothing was saved: run the same command again with --cuda_graph False$"),
    (dict(recovers=False), 2, r"holds step 2\. Resume with: python main.py --load_path \S+ --cuda_graph False$"),
    (dict(broken="CUDA error: an illegal memory access was encountered"), 100, "nothing was saved"),
], ids=["torch 2.11 and older", "torch 2.11 and older, a checkpoint", "broken"])
def test_a_capture_the_device_does_not_recover_from_stops_the_run_in_one_line(config, capsys, device, every, way_on):
    """torch 2.11 and older leave the generator capturing after a failed capture: nothing random
    runs again, so the run stops with what failed, why, and the way on."""
    fake = FakeCuda(**device)
    with cuda.use(fake):
        trainer = trainer_for(dataclasses.replace(config, train_steps=8, save_and_sample_every=every))
        trainer.model.final_conv.weight.register_hook(HostRead(when=lambda: fake.in_capture))
        with pytest.raises(UserError, match=way_on) as stopped:
            trainer.fit()
    said = str(stopped.value)
    assert said.startswith(f"the training step could not be captured in a CUDA graph: its capture failed (RuntimeError "
                           f"at tests/test_capture.py:{HOST_READ_LINE}: a value read on the host: operation not permitted")
    trouble = "a random draw: Offset increment outside graph capture" if "recovers" in device else \
        "synchronizing: CUDA error: an illegal memory access was encountered"
    assert f"the GPU did not recover ({trouble}" in said
    assert "could not be captured" not in capsys.readouterr().err  # no note: the run stopped


@pytest.mark.parametrize("skew,captured", [(1e-2, False), (TOLERANCE / 10, True)])
def test_the_first_captured_step_is_held_to_an_eager_one_from_the_same_state(config, capsys, skew, captured):
    """A graph that computes something else (the fake's replays skewed): beyond the tolerance the
    run goes on eagerly from the eager step's result, with one note; within it, captured."""
    with cuda.use(FakeCuda(skew=skew)), pytest.MonkeyPatch.context() as m:
        m.setattr(precision, "_warned", set())
        trainer = trainer_for(config)
        losses = [trainer.train_step() for _ in range(WARMUP_STEPS + 3)]
    step = trainer.one_step
    assert step.agreement == pytest.approx(skew, rel=1e-3)
    assert (step.graph is not None) is captured
    if not captured:
        with cuda.use(FakeCuda()):  # an eager run on the fake device: its passes joined as the captured run's
            eager_losses, eager_after = eager_run(config, WARMUP_STEPS + 3)
        assert losses == eager_losses
        assert_same_state(state(trainer), eager_after)
        assert capsys.readouterr().err.count("its first replay differed from an eager step by 1.0e-02 "
                                             "(more than 1e-03)") == 1


def sampling_model():
    torch.manual_seed(0)
    model = fast.speed_up(Unet(8, dim_mults=(1, 2)), CUDA_LEVERS)
    return Diffusion(model, image_size=16, timesteps=5)


def test_captured_sampling_keeps_a_graph_per_pass_shape_and_sees_new_weights(fake):
    diffusion = sampling_model()
    with cuda.use(cuda.Cuda()):  # the same model evaluated eagerly
        eager = [generate(diffusion, n, seed=3) for n in (4, 3)]
    captured = [generate(diffusion, n, seed=3) for n in (4, 3, 4)]
    assert fake.captures == 2  # one per pass shape, the first reused
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
    assert torch.equal(captured[2], eager[0])
    assert replay.agreed[diffusion.model] == 0.0
    with torch.no_grad():  # training updates the weights in place: the next replay reads them
        for p in diffusion.model.parameters():
            p.mul_(0.9)
    with cuda.use(cuda.Cuda()):
        changed = generate(diffusion, 4, seed=3)
    assert not torch.equal(changed, eager[0])
    assert torch.equal(generate(diffusion, 4, seed=3), changed)
    assert fake.captures == 2


def read_while_sampling(model, when=lambda: True):
    def hook(module, args, out):
        if when():
            out.sum().item()  # the line the notes name

    model.final_conv.register_forward_hook(hook)


SAMPLING_READ_LINE = read_while_sampling.__code__.co_firstlineno + 3


@pytest.mark.parametrize("fails", ["watched", "in the capture", "skewed"])
def test_sampling_that_cannot_be_captured_runs_eagerly_with_one_note(fake, capsys, fails):
    diffusion = sampling_model()
    with cuda.use(cuda.Cuda()):
        eager = generate(diffusion, 4, seed=3)
    if fails == "skewed":
        fake.skew = 1e-2
    else:
        read_while_sampling(diffusion.model, when=(lambda: fake.in_capture) if fails == "in the capture" else
                            lambda: True)
    assert torch.equal(generate(diffusion, 4, seed=3), eager)
    assert torch.equal(generate(diffusion, 4, seed=3), eager)
    assert diffusion.model in replay.eager and fake.captures == (0 if fails == "watched" else 1)
    why = {"watched": "a graph cannot hold a value read on the host (.item()) at diffusion.py:",
           "in the capture": f"its capture failed (RuntimeError at tests/test_capture.py:{SAMPLING_READ_LINE}: a value "
                             f"read on the host (.item()): operation not permitted when stream is capturing",
           "skewed": "its first replay differed from an eager evaluation by 1.0e-02 (more than 1e-03)"}[fails]
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: sampling runs eagerly, not in a CUDA graph: {why}")


def test_a_sampling_capture_the_device_does_not_recover_from_raises_capture_broke():
    diffusion = sampling_model()
    fake = FakeCuda(recovers=False)
    with cuda.use(fake):
        read_while_sampling(diffusion.model, when=lambda: fake.in_capture)
        with pytest.raises(cuda.CaptureBroke, match=r"^sampling could not be captured in a CUDA graph: its capture "
                                                    rf"failed \(RuntimeError at tests/test_capture.py:{SAMPLING_READ_LINE}:"
                                                    r" .*\), and the GPU did not recover \(a random draw: Offset increment"):
            generate(diffusion, 4, seed=3)
