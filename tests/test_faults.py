"""Killing and interrupting real training processes: nothing is lost beyond the last checkpoint."""
import errno
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from conftest import ROOT
from diffusion import Diffusion
from hw2.checkpoint import load_checkpoint
from hw2.runlog import read_metrics
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
    logged = [r["step"] for r in read_metrics(out)]
    assert logged == list(range(1, len(logged) + 1))  # no step lost or repeated in metrics.csv


def run_main(args, capsys):
    status = main.main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return status, errors, err


def base_args(image_root, tmp_path, out):
    return [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c")]


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(image_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = Diffusion.p_loss

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 * 2 else loss  # steps 1-2 fine (2 passes each), step 3 NaN

    monkeypatch.setattr(Diffusion, "p_loss", failing)
    status, errors, err = run_main([*base_args(image_root, tmp_path, out), "--train_steps", "6",
                                    "--save_and_sample_every", "2"], capsys)
    assert status == 1 and len(errors) == 1 and "Traceback" not in err
    assert "the loss became nan at step 3" in errors[0]
    assert load_checkpoint(out / "model-latest.pt")["step"] == 2
    assert sorted(p.name for p in out.glob("model-*.pt")) == ["model-1.pt", "model-latest.pt"]


def test_an_unwritable_save_folder(image_root, tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    status, errors, err = run_main(base_args(image_root, tmp_path, tmp_path / "file" / "results"), capsys)
    assert status == 1 and len(errors) == 1 and "cannot write to --save_folder" in errors[0]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(image_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def filling(obj, f, *args, **kwargs):
        saves["n"] += isinstance(obj, dict) and "optimizer" in obj  # checkpoints, not the image cache
        if saves["n"] > 1 and isinstance(obj, dict) and "optimizer" in obj:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling)
    status, errors, err = run_main([*base_args(image_root, tmp_path, out), "--train_steps", "4",
                                    "--save_and_sample_every", "2"], capsys)
    assert status == 1 and len(errors) == 1 and "Traceback" not in err
    assert "No space left on device" in errors[0] and "previous checkpoint" in errors[0]
    monkeypatch.undo()
    assert load_checkpoint(out / "model-latest.pt")["step"] == 2
    assert not (out / "model-2.pt").exists() and not list(out.glob(".*tmp*"))


def test_keep_checkpoints_keeps_the_newest(image_root, tmp_path, capsys):
    out = tmp_path / "run"
    status, _, _ = run_main([*base_args(image_root, tmp_path, out), "--train_steps", "5",
                             "--save_and_sample_every", "1", "--keep_checkpoints", "2", "--num_samples", "1"], capsys)
    assert status == 0
    assert sorted(p.name for p in out.glob("model-*.pt")) == ["model-4.pt", "model-5.pt", "model-latest.pt"]


def test_missing_checkpoint_and_inception_file(image_root, tmp_path, capsys):
    status, errors, _ = run_main([*base_args(image_root, tmp_path, tmp_path / "r"), "--load_path",
                                  str(tmp_path / "nope.pt")], capsys)
    assert status == 1 and "checkpoint" in errors[0] and "does not exist" in errors[0]
    status, errors, _ = run_main([*base_args(image_root, tmp_path, tmp_path / "r"), "--fid", "--inception_path",
                                  str(tmp_path / "nope.pt")], capsys)
    assert status == 1 and "--inception_path points at" in errors[0]
