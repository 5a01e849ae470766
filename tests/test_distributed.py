"""torchrun with 2 CPU processes (gloo): the same training as one process at twice the batch."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from hw2.runlog import read_metrics
from test_cli import TINY
from unet import Unet

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

COMMON = [*TINY, "--amp", "off", "--num_samples", "4", "--save_and_sample_every", "3", "--wandb", "disabled"]


def train(image_root, tmp_path, out, processes, batch, steps, *extra):
    args = [*COMMON, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"),
            "--save_folder", str(out), "--batch_size", str(batch), "--train_steps", str(steps), *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "main.py", *args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, torch.load(out / "model-latest.pt", weights_only=True)


def assert_same_model(a, b):
    """The same function, to float precision. (Weights are not compared one by one: a conv
    bias right before a one-channel-per-group GroupNorm gets a zero gradient, and Adam
    turns rounding noise in it into full-size steps that change nothing downstream.)"""
    assert a.keys() == b.keys()
    torch.manual_seed(0)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 3, 4])
    outputs = []
    for state in (a, b):
        model = Unet(8, dim_mults=(1, 2))
        model.load_state_dict(state)
        with torch.no_grad():
            outputs.append(model(x, t))
    assert torch.allclose(*outputs, rtol=1e-4, atol=1e-5), (outputs[0] - outputs[1]).abs().max()


def test_two_processes_equal_one_at_twice_the_batch_and_resume_across_counts(image_root, tmp_path):
    # one process at batch 4 for 5 steps; its model-1.pt is step 3
    one, straight = train(image_root, tmp_path, tmp_path / "one", 1, 4, 5)
    at_three = torch.load(tmp_path / "one" / "model-1.pt", weights_only=True)
    two, two_out = train(image_root, tmp_path, tmp_path / "two", 2, 2, 3)
    assert two_out["step"] == at_three["step"] == 3
    assert not any(k.startswith("module.") for k in two_out["model"])
    assert_same_model(two_out["model"], at_three["model"])
    losses = [[r["loss"] for r in read_metrics(tmp_path / name)][:3] for name in ("two", "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)

    # only rank 0 printed and wrote: one config, one completion, the single-process file set
    assert two.stdout.count("config:") == 1 and two.stdout.count("training completed") == 1
    assert "2 processes" in two.stdout
    names = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))  # noqa: E731
    assert names(tmp_path / "two") == names(tmp_path / "one")

    # the 2-process checkpoint resumes in 1 process (and the 1-process one in 2): the same as 5 steps straight
    _, resumed_one = train(image_root, tmp_path, tmp_path / "two", 1, 4, 5, "--load_path", str(tmp_path / "two"))
    _, resumed_two = train(image_root, tmp_path, tmp_path / "three", 2, 2, 5, "--load_path",
                           str(tmp_path / "one" / "model-1.pt"))
    assert straight["step"] == resumed_one["step"] == resumed_two["step"] == 5
    assert_same_model(resumed_one["model"], straight["model"])
    assert_same_model(resumed_two["model"], straight["model"])


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
