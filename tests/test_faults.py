"""Killing and interrupting real training processes: nothing is lost beyond the last checkpoint."""
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from hw2.checkpoint import load_checkpoint
from test_cli import TINY


def start(image_root, tmp_path, out, *extra):
    args = [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c"),
            "--train_steps", "100000", "--save_and_sample_every", "1", "--num_samples", "1", *extra]
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(image_root, tmp_path, sig, status):
    out = tmp_path / "run"
    proc = start(image_root, tmp_path, out)
    wait_for(out / "model-latest.pt", proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    last = err.strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name} at step" in last and "--load_path" in last and "Traceback" not in err
    step = int(last.split("at step ")[1].split(";")[0])
    assert load_checkpoint(out / "model-latest.pt")["step"] == step


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(image_root, tmp_path):
    """Every step is a milestone, so the kills land in and around checkpoint writes."""
    rng = random.Random(0)
    out = tmp_path / "run"
    steps = []
    for attempt in range(4):
        extra = ["--load_path", str(out / "model-latest.pt")] if attempt else []
        proc = start(image_root, tmp_path, out, *extra)
        wait_for(out / f"model-{(steps[-1] if steps else 0) + 1}.pt", proc)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.communicate()
        ckpt = load_checkpoint(out / "model-latest.pt")
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
        steps.append(ckpt["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]  # each restart resumed and went further
