"""torchrun with 2 CPU processes (gloo): the same training as one process at twice the batch."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from hw2.runlog import read_metrics
from test_cli import TINY

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

COMMON = [*TINY, "--amp", "off", "--num_samples", "4", "--save_and_sample_every", "1", "--wandb", "disabled"]


def train(image_root, tmp_path, out, processes, batch, steps, *extra):
    args = [*COMMON, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"),
            "--save_folder", str(out), "--batch_size", str(batch), "--train_steps", str(steps), *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "main.py", *args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, torch.load(out / "model-latest.pt", weights_only=True)


def adam_moments(checkpoint):
    """Per parameter: Adam's running mean and square of the gradient, and its update."""
    group = checkpoint["optimizer"]["param_groups"][0]
    assert len(checkpoint["optimizer"]["param_groups"]) == 1 and group["weight_decay"] == 0
    assert len(checkpoint["optimizer"]["state"]) == len(checkpoint["model"])  # parameters only, in order
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    moments = {}
    for i, name in enumerate(checkpoint["model"]):
        state = checkpoint["optimizer"]["state"][i]
        step = float(state["step"])
        m, v = state["exp_avg"].double(), state["exp_avg_sq"].double()
        update = lr / (1 - beta1**step) * m / (v.sqrt() / (1 - beta2**step) ** 0.5 + eps)
        moments[name] = m, v, update
    return moments


def weights_before(checkpoint):
    """The weights the checkpoint's last step started from: its weights plus that step's update."""
    moments = adam_moments(checkpoint)
    return {name: w.double() + moments[name][2] for name, w in checkpoint["model"].items()}


def assert_same_step(a, b):
    """The same optimizer step from the same weights, to float precision. The two ways sum the
    same gradients in other orders, which changes their last bits only; so Adam's moments agree
    to 1e-4 of each tensor's largest (1e-6 of the model's largest where the true gradient is zero,
    a conv bias right before a one-channel-per-group GroupNorm: rounding noise only). The weights
    are not compared directly: Adam's first step moves a weight by lr * g / (|g| + eps), the full
    lr whatever the size of g, so where a gradient is rounding noise around zero the two runs
    move it in different directions, and the function then differs by an amount that depends on
    the CPU's kernels (4e-5 of the output with torch 2.4 on an AVX-512 CPU). Instead each run's
    weights less its own update must be the same weights, to float rounding: the step was taken
    from the same state, by Adam's rule, with the moments compared above."""
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    ours, theirs = adam_moments(a), adam_moments(b)
    for k in (0, 1):
        largest = max(moments[k].abs().max().item() for moments in theirs.values())
        for name in ours:
            x, y = ours[name][k], theirs[name][k]
            assert (x - y).abs().max() <= 1e-4 * y.abs().max() + 1e-6 * largest, (name, k)
    before_a, before_b = weights_before(a), weights_before(b)
    for name in before_a:
        assert torch.allclose(before_a[name], before_b[name], rtol=2.5e-7, atol=1e-7), name


def step_losses(folder):
    return [r["loss"] for r in read_metrics(folder)]


def test_two_processes_equal_one_at_twice_the_batch_and_resume_across_counts(image_root, tmp_path):
    # two steps from the same seed: one process at batch 4, two at batch 2 (the same global batch)
    one, _ = train(image_root, tmp_path, tmp_path / "one", 1, 4, 2)
    two, two_out = train(image_root, tmp_path, tmp_path / "two", 2, 2, 2)
    first = {n: torch.load(tmp_path / n / "model-1.pt", weights_only=True) for n in ("one", "two")}
    assert first["two"]["step"] == first["one"]["step"] == 1
    assert not any(k.startswith("module.") for k in first["two"]["model"])
    assert step_losses(tmp_path / "two")[0] == pytest.approx(step_losses(tmp_path / "one")[0], rel=1e-5)
    assert_same_step(first["two"], first["one"])

    # only rank 0 printed and wrote: one config, one completion, the single-process file set
    assert two.stdout.count("config:") == 1 and two.stdout.count("training completed") == 1
    assert "2 processes" in two.stdout
    names = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")
    # each process drew its share of the samples from a generator of its own: four different images
    drawn = [p.read_bytes() for p in sorted((tmp_path / "two" / "sample_ddpm_1").glob("*.png"))]
    assert len(drawn) == 4 and len(set(drawn)) == 4

    # the 2-process checkpoint of step 1 resumed for step 2 in one process and in two: the same step
    # (its data, t and noise come from the checkpoint's states, whatever the process count)
    checkpoint = str(tmp_path / "two" / "model-1.pt")
    one_more, resumed_one = train(image_root, tmp_path, tmp_path / "r1", 1, 4, 2, "--load_path", checkpoint)
    _, resumed_two = train(image_root, tmp_path, tmp_path / "r2", 2, 2, 2, "--load_path", checkpoint)
    assert resumed_one["step"] == resumed_two["step"] == 2
    assert step_losses(tmp_path / "r2")[-1] == pytest.approx(step_losses(tmp_path / "r1")[-1], rel=1e-5)
    assert_same_step(resumed_one, resumed_two)
    step_one = torch.load(checkpoint, weights_only=True)["model"]
    for name, w in weights_before(resumed_one).items():
        assert torch.allclose(w, step_one[name].double(), rtol=2.5e-7, atol=1e-7), name
    assert "the checkpoint holds the random states of 2 process(es), this run has 1" in one_more.stdout
    # and the other way, one process's checkpoint in two: the note once, from the main process
    more, _ = train(image_root, tmp_path, tmp_path / "r3", 2, 2, 2, "--load_path", str(tmp_path / "one" / "model-1.pt"))
    assert more.stdout.count("note: the checkpoint holds the random states of 1 process(es), this run has 2") == 1

    # each process's random streams continue as in the run that was never stopped: the same
    # step 2, and the same states in its checkpoint, one per process
    assert step_losses(tmp_path / "r2")[-1] == step_losses(tmp_path / "two")[-1]
    assert len(two_out["rng"]["processes"]) == len(resumed_two["rng"]["processes"]) == 2
    for theirs, ours in zip(two_out["rng"]["processes"], resumed_two["rng"]["processes"]):
        assert torch.equal(theirs["torch"], ours["torch"])


def test_when_one_process_dies_the_others_stop(image_root, tmp_path):
    """SIGKILL one worker mid-run: torchrun ends the other and exits non-zero, without hanging."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    args = [*COMMON, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"), "--save_folder", str(out),
            "--batch_size", "2", "--train_steps", "100000", "--save_and_sample_every", "1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.Popen([*launcher, "main.py", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "model-1.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert torch.load(out / "model-latest.pt", weights_only=True)["step"] >= 1  # the last checkpoint is whole
