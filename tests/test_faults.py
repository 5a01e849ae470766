"""Killing and interrupting real training processes: nothing is lost beyond the last checkpoint."""
import errno
import signal
import subprocess
import sys
import threading
import time

import numpy as np
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


class StderrReader:
    """Collects a process's stderr as it comes (progress bars write without newlines)."""

    def __init__(self, proc):
        self.text = ""
        self.proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.text += chunk

    def wait_for(self, needle, timeout=60):
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"{needle!r} did not appear in:\n{self.text[-2000:]}"
            time.sleep(0.02)
        return time.monotonic()


def test_ctrl_c_during_milestone_sampling_is_acknowledged_and_a_second_one_tells_the_truth(image_root, tmp_path):
    out = tmp_path / "run"
    proc = start(image_root, tmp_path, out, "--num_samples", "3000", "--time_steps", "50")
    reader = StderrReader(proc)
    reader.wait_for("sampling 3000 images")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    acknowledged = reader.wait_for("SIGINT: stopping after this milestone's samples (its checkpoint is already saved)")
    assert acknowledged - sent < 2.0
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    last = reader.text.strip().splitlines()[-1]
    step = load_checkpoint(out / "model-latest.pt")["step"]
    assert last == (f"interrupted at step {step}; {out / 'model-latest.pt'} holds step {step}. "
                    f"Resume with: python main.py --load_path {out}")


def killed_mid_write(name, nth, args):
    """Run main.py with args, SIGKILLed halfway through the nth write of the file `name`."""
    proc = subprocess.run([sys.executable, "tests/kill_mid_write.py", name, str(nth), "--", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def temporaries(*folders):
    return [p for folder in folders if folder.exists() for p in folder.rglob(".*.tmp*")]


@pytest.mark.parametrize("name,nth,rows", [
    ("model-2.pt", 1, 2),       # the numbered checkpoint of step 2: model-latest.pt still holds step 1
    ("model-latest.pt", 2, 2),  # model-latest.pt at step 2: its step-1 version stays
    ("metrics.csv", 3, 1),      # metrics.csv (written at the start, step 1 appended, step 2 appended): step 1's row
])
def test_a_kill_in_the_middle_of_a_write_leaves_the_previous_version(image_root, tmp_path, name, nth, rows):
    out = tmp_path / "run"
    args = [*TINY, "--data_path", image_root, "--save_folder", out, "--cache_dir", tmp_path / "c", "--train_steps", "3",
            "--save_and_sample_every", "1", "--num_samples", "1", "--wandb", "disabled"]
    killed_mid_write(name, nth, args)
    half = temporaries(out)
    if name == "metrics.csv":  # rows are appended: the kill cut the last line short
        assert half == [] and not (out / name).read_text().endswith("\n")
    else:
        assert [p.name.split(".tmp")[0] for p in half] == [f".{name}"]  # the kill landed inside that write
    assert load_checkpoint(out / "model-latest.pt")["step"] == 1
    assert [r["step"] for r in read_metrics(out)] == list(range(1, rows + 1))  # rows past step 1 go at resume
    if name == "model-2.pt":
        assert not (out / "model-2.pt").exists()

    resumed = subprocess.run([sys.executable, "main.py", "--load_path", str(out), "--cache_dir", str(tmp_path / "c")],
                             cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert temporaries(out) == []  # the next write of each file swept its stale temporary away
    assert [load_checkpoint(out / f"model-{m}.pt")["step"] for m in (1, 2, 3, "latest")] == [1, 2, 3, 3]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_a_run_killed_during_a_milestones_outputs_makes_them_when_resumed(image_root, tmp_path, standin_file):
    """Killed while milestone 1 writes its third sample image (its checkpoint is on disk): the
    resumed run makes milestone 1's images, grid, FID and held-out loss first, the same images an
    uninterrupted run makes, then trains on; metrics.csv has each milestone's FID and held-out
    loss once."""
    args = [*TINY, "--data_path", image_root, "--cache_dir", tmp_path / "c", "--train_steps", "2",
            "--save_and_sample_every", "1", "--fid", "--fid_num_samples", "4", "--inception_path", standin_file,
            "--heldout_images", "2", "--wandb", "disabled"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main.main([*map(str, args), "--save_folder", str(straight)]) == 0
    killed_mid_write("00002.png", 1, [*args, "--save_folder", out])
    assert load_checkpoint(out / "model-latest.pt")["step"] == 1
    assert len(list((out / "sample_ddpm_1").glob("*.png"))) == 2 and not (out / "sample-1.png").exists()

    resumed = subprocess.run([sys.executable, "main.py", "--load_path", str(out), "--cache_dir", str(tmp_path / "c"),
                              "--inception_path", str(standin_file)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("milestone 1 was interrupted before sample_ddpm_1/, sample-1.png, its FID, its held-out loss were made"
            in resumed.stdout)
    for m in (1, 2):
        names = sorted(p.name for p in (out / f"sample_ddpm_{m}").iterdir())
        assert names == [f"{i:05d}.png" for i in range(4)]  # no half-written temporary left
        for i in range(4):
            assert (out / f"sample_ddpm_{m}" / f"{i:05d}.png").read_bytes() == \
                (straight / f"sample_ddpm_{m}" / f"{i:05d}.png").read_bytes()
        assert (out / f"sample-{m}.png").read_bytes() == (straight / f"sample-{m}.png").read_bytes()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["fid"] is not None for r in rows)
    assert [r["fid"] for r in rows] == pytest.approx([r["fid"] for r in read_metrics(straight)])
    assert [r["heldout_loss"] for r in rows] == pytest.approx([r["heldout_loss"] for r in read_metrics(straight)])
    assert all(r["heldout_loss"] is not None for r in rows)
    assert (out / "metrics.csv").read_text().count("\n1,") == 1


def test_a_run_killed_during_its_last_milestone_is_not_finished_until_its_outputs_are(image_root, tmp_path):
    """Killed while the last milestone (step 2 of 2) writes its images: its checkpoint says the run
    reached --train_steps, yet a resume makes that milestone's images, grid and the final grid."""
    args = [*TINY, "--data_path", image_root, "--cache_dir", tmp_path / "c", "--train_steps", "2",
            "--save_and_sample_every", "1", "--wandb", "disabled"]
    out = tmp_path / "run"
    killed_mid_write("00002.png", 2, [*args, "--save_folder", out])  # the second milestone's third image
    assert load_checkpoint(out / "model-latest.pt")["step"] == 2 and not (out / "sample-2.png").exists()
    resumed = subprocess.run([sys.executable, "main.py", "--load_path", str(out), "--cache_dir", str(tmp_path / "c")],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is finished" not in resumed.stdout and "milestone 2 was interrupted" in resumed.stdout
    assert len(list((out / "sample_ddpm_2").glob("*.png"))) == 4
    assert (out / "sample-2.png").is_file() and (out / "sample-final.png").is_file()
    again = subprocess.run([sys.executable, "main.py", "--load_path", str(out), "--cache_dir", str(tmp_path / "c")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "is finished: it reached step 2" in again.stdout  # now it is


def test_a_kill_while_caching_fid_statistics_leaves_no_half_cache(image_root, tmp_path, standin_file):
    out, cache = tmp_path / "run", tmp_path / "c"
    args = [*TINY, "--data_path", image_root, "--save_folder", out, "--cache_dir", cache, "--train_steps", "1",
            "--fid", "--fid_num_samples", "4", "--inception_path", standin_file, "--wandb", "disabled"]
    killed_mid_write("fid-real-", 1, args)
    assert len(temporaries(cache)) == 1 and not list(cache.glob("fid-real-*.npz"))
    again = subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert temporaries(cache, out) == []
    (stats,) = cache.glob("fid-real-*.npz")
    with np.load(stats) as stored:
        assert stored["mu"].shape == (2048,) and np.isfinite(stored["sigma"]).all()


def run_main(args, capsys):
    status = main.main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return status, errors, err


def base_args(image_root, tmp_path, out):
    return [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c")]


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(image_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    seen = {"images": 0}
    real = Diffusion.p_loss

    def failing(self, x_0, *args, **kwargs):
        seen["images"] += x_0.shape[0]  # counted in images: a step's passes may run joined
        loss = real(self, x_0, *args, **kwargs)
        return loss * float("nan") if seen["images"] > 2 * 2 * 4 else loss  # steps 1-2 fine (2 x 4 images), 3 NaN

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
