"""The path every run on a CUDA GPU takes, run on a CPU through the fake CUDA device
(hw2/fast/fake_cuda.py): the captured training step (hw2/fast/step.py) as the Trainer calls
it, the fallback after a failed capture, and captured sampling (hw2/fast/replay.py)."""
import dataclasses

import pytest
import torch

import main
from diffusion import Diffusion
from hw2 import fast, precision
from hw2.config import Config
from hw2.data import training_data
from hw2.errors import UserError
from hw2.fast import cuda, replay
from hw2.fast.fake_cuda import FakeCuda
from hw2.fast.step import WARMUP_STEPS, CudaStep
from hw2.sampling import generate
from hw2.step import TrainStep
from test_cli import tiny_args
from trainer import Trainer
from unet import Unet

CUDA_LEVERS = tuple(x for x in fast.LEVERS if x not in ("attention_kernel", "base2_softmax", "channels_last"))


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())  # each test sees its notes
    with cuda.use(FakeCuda()) as device:
        yield device


@pytest.fixture
def config(tiny_config):
    """Two passes a step, float32 (as --amp auto on CUDA)."""
    return dataclasses.replace(tiny_config, gradient_accumulate_every=2, amp="off")


def trainer_for(config, amp_dtype=None, model=None):
    torch.manual_seed(config.seed)
    model = model or fast.for_run(Unet(config.unet_dim, dim_mults=config.unet_dim_mults), config)
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


def test_the_trainer_warms_up_then_captures_once_and_replays(config, fake):
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
    assert step.failed is None


def test_captured_losses_and_weights_are_those_of_the_eager_step(config, fake):
    """The captured step computes what the eager step computes, bit for bit, through the fake;
    each loss returned is the caller's to keep (a later replay does not overwrite it)."""
    captured = trainer_for(config)
    eager = trainer_for(dataclasses.replace(config, cuda_graph=False))
    assert not eager.one_step.capture
    kept = []
    torch.manual_seed(1)
    for _ in range(8):
        captured.model.train()
        captured.one_step.load(next(captured.batches) for _ in range(2))
        loss = captured.one_step()
        kept.append((loss, loss.item()))
    assert all(tensor.item() == value for tensor, value in kept)
    torch.manual_seed(1)
    assert [v for _, v in kept] == [eager.train_step() for _ in range(8)]
    assert_same_state(state(captured), state(eager))
    assert fake.captures == 1


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
    """A gradient hook that reads a value on the host, as an edited layer might: no capture holds it."""

    def __call__(self, grad):
        grad.sum().item()


@pytest.mark.parametrize("where", ["backward", "optimizer"])
def test_a_failed_capture_runs_on_eagerly_from_the_state_before_it(config, fake, capsys, where):
    """The capture fails in the backward (a host read in a gradient hook, after the forward
    drew its t and noise) or in the optimizer (an Adam not built capturable, whose step
    reads its step count on the host after counting it up): the run goes on eagerly with the
    weights, optimizer state and random state an eager run has, and says so once."""
    runs = []
    for capture in (None, False):
        trainer = trainer_for(dataclasses.replace(config, cuda_graph=capture))
        if where == "backward":
            trainer.model.final_conv.weight.register_hook(HostRead())
        else:  # what a plain Adam's state_dict, loaded with its settings, made of this run's optimizer
            trainer.opt = trainer.one_step.step.opt = torch.optim.Adam(trainer.model.parameters(), lr=1e-3,
                                                                        foreach=True)
        losses = [trainer.train_step() for _ in range(WARMUP_STEPS + 3)]
        runs.append((losses, state(trainer)))
    (losses, after), (eager_losses, eager_after) = runs
    assert losses == eager_losses
    assert_same_state(after, eager_after)
    assert fake.captures == 1
    err = capsys.readouterr().err
    assert err.count("could not be captured") == 1
    assert "note: the training step could not be captured in a CUDA graph (RuntimeError: " in err
    assert err.rstrip().endswith("it runs eagerly")


@pytest.mark.parametrize("saved_step,way_on", [
    (None, r"nothing was saved: run the same command again with --cuda_graph False$"),
    (2, r"holds step 2\. Resume with: python main.py --load_path \S+ --cuda_graph False$"),
])
def test_a_capture_that_leaves_the_gpu_unusable_stops_the_run_naming_the_way_on(config, fake, saved_step, way_on):
    fake.broken = "CUDA error: an illegal memory access was encountered"
    trainer = trainer_for(config)
    trainer.model.final_conv.weight.register_hook(HostRead())
    trainer.saved_step = saved_step
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    with pytest.raises(UserError, match=way_on) as stopped:
        trainer.train_step()
    assert "could not be captured" in str(stopped.value)
    assert "did not recover (CUDA error: an illegal memory access was encountered)" in str(stopped.value)


def test_a_torch_older_than_the_captures_have_run_on_steps_eagerly(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu121")
    capture, why = fast.step_plan("cuda", None, None, Config())
    assert not capture and why == "torch 2.10.1+cu121: the capture has run on torch 2.11 and newer only"
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert fast.step_plan("cuda", None, None, Config()) == (True, None)


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
    with torch.no_grad():  # training updates the weights in place: the next replay reads them
        for p in diffusion.model.parameters():
            p.mul_(0.9)
    with cuda.use(cuda.Cuda()):
        changed = generate(diffusion, 4, seed=3)
    assert not torch.equal(changed, eager[0])
    assert torch.equal(generate(diffusion, 4, seed=3), changed)
    assert fake.captures == 2


def test_a_sampling_capture_that_fails_samples_eagerly(fake, capsys):
    diffusion = sampling_model()
    diffusion.model.final_conv.register_forward_hook(lambda module, args, out: out.sum().item() and None)
    with cuda.use(cuda.Cuda()):
        eager = generate(diffusion, 4, seed=3)
    assert torch.equal(generate(diffusion, 4, seed=3), eager)
    assert diffusion.model in replay._failed and fake.captures == 1
    assert capsys.readouterr().err.count("note: sampling could not be captured") == 1


def test_a_resumed_run_keeps_the_optimizer_it_built_and_captures(image_root, tmp_path, fake):
    """A --plain run's checkpoint (plain Adam) resumed by a default run: fused Adam on a CPU, and
    with the fake CUDA device a capturable one whose step is captured; resumed again with
    --plain, the plain Adam again. The optimizer's settings are the run's, its values the
    checkpoint's."""
    out = tmp_path / "results"
    common = ["--cache_dir", str(tmp_path / "cache"), "--wandb", "disabled", "--amp", "off"]

    def run(*args, fake_device=False):
        with cuda.use(fake if fake_device else cuda.Cuda()):
            return main.run(*main.parse_config([*args, *common]))

    run(*tiny_args(image_root, tmp_path, "--train_steps", "2", "--save_and_sample_every", "100", "--plain"))
    saved = torch.load(out / "model-latest.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert not saved["fused"] and not saved["capturable"]
    resumed = run("--load_path", str(out), "--train_steps", "3")
    assert resumed.opt.param_groups[0]["fused"] and not resumed.opt.param_groups[0]["capturable"]
    captured = run("--load_path", str(out), "--train_steps", str(3 + WARMUP_STEPS + 2), fake_device=True)
    assert captured.opt.param_groups[0]["fused"] and captured.opt.param_groups[0]["capturable"]
    assert captured.one_step.graph is not None and captured.one_step.failed is None  # captured, and replayed since
    plain = run("--load_path", str(out), "--train_steps", str(3 + WARMUP_STEPS + 3), "--plain")
    assert not plain.opt.param_groups[0]["fused"] and not plain.opt.param_groups[0]["capturable"]
    assert float(plain.opt.state[next(plain.model.parameters())]["step"]) == 3 + WARMUP_STEPS + 3
