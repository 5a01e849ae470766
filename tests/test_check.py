"""python -m hw2.check, the quick check after an edit: it passes on the project as it is, and
each kind of breakage it is for stops it with one line naming the check (and the line of
unet.py or diffusion.py where an error was raised)."""
import math
import os
import re
import subprocess
import sys

import pytest

import diffusion
from conftest import ROOT
from hw2 import check

sys.path.insert(0, str(ROOT / "benchmarks"))
from drills import project_copy  # noqa: E402


def test_a_q_sample_of_the_wrong_shape_fails_its_check(capsys, monkeypatch):
    monkeypatch.setattr(diffusion.Diffusion, "q_sample", lambda self, x_0, t, noise=None: x_0[:, :1])
    assert check.main() == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "FAILED q_sample: q_sample gave (8, 1, 16, 16) (finite: True) for x_0 (8, 3, 16, 16)"


def test_an_error_names_the_line_of_diffusion_py_it_came_from(capsys, monkeypatch):
    def broken(a, t, x_shape):
        raise IndexError("index 50 is out of bounds")

    monkeypatch.setattr(diffusion, "extract", broken)
    assert check.main() == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("FAILED q_sample at diffusion.py:") and last.endswith(": IndexError: index 50 is out of bounds")


def test_a_loss_that_does_not_fall_fails_the_training_check(capsys, monkeypatch):
    def constant(self, x_0, t, noise=None):
        return self.model(x_0, t).mean() * 0 + 1.0

    monkeypatch.setattr(diffusion.Diffusion, "p_loss", constant)
    monkeypatch.setattr(check, "STEPS", 12)
    monkeypatch.setattr(check, "WINDOW", 4)
    assert check.main() == 1
    assert capsys.readouterr().out.splitlines()[-1] == ("FAILED training: the loss did not fall over 12 steps: "
                                                        "1.0000 at first, 1.0000 at the end")


def test_samples_that_are_not_finite_fail_the_sampling_check(capsys, monkeypatch):
    monkeypatch.setitem(check.CHECKS, "training", lambda d: "left out")
    real = diffusion.Diffusion.p_sample

    def nan_at_the_end(self, x, t, t_index, generator=None):
        out = real(self, x, t, t_index, generator=generator)
        return out * math.nan if t_index == 0 else out

    monkeypatch.setattr(diffusion.Diffusion, "p_sample", nan_at_the_end)
    assert check.main() == 1
    assert capsys.readouterr().out.splitlines()[-1] == "FAILED sampling: the sampled images are not finite (NaN or inf)"


# python -m hw2.check as a student runs it, on a copy of the project with one file edited

BREAKS = {  # name: (file, as shipped, edited, the last line the check prints: its start; {line}: the edit's)
    "the U-Net's output of the right size but the wrong channels": (
        "unet.py", "self.out_dim = default(out_dim, default_out_dim)",
        "self.out_dim = default(out_dim, default_out_dim) * 2",
        "FAILED the U-Net: the U-Net gave (8, 6, 16, 16) for images (8, 3, 16, 16); the noise prediction must have "
        "the images' shape"),
    "samples outside [0, 1]": (
        "diffusion.py", "return ((x + 1.0) * 0.5).clamp(0.0, 1.0)", "return (x + 1.0) * 0.6",
        "FAILED sampling: the sampled images span [0."),
    "an error while building the model": (
        "unet.py", "self.final_conv = nn.Conv2d(dim, self.out_dim, 1)",
        "self.final_conv = nn.Conv2d(dim, self.out_dim, kernel)",
        "FAILED building the model at unet.py:{line}: NameError: name 'kernel' is not defined"),
    "an error deep in the U-Net": (  # the deepest line of unet.py, not ResnetBlock's call of the Block
        "unet.py", "        x = self.proj(x)\n        x = self.norm(x)",
        "        x = self.proj(x)\n        raise ValueError('a Block that fails')",
        "FAILED the U-Net at unet.py:{line}: ValueError: a Block that fails"),
}


@pytest.mark.parametrize("name", BREAKS)
def test_the_check_as_a_student_runs_it_fails_with_status_1_and_names_the_line(name, tmp_path):
    edited, old, new, last = BREAKS[name]
    folder = project_copy(tmp_path / "project", old, new, edited=edited)
    line = next(k for k, text in enumerate((folder / edited).read_text().splitlines(), 1)
                if new.splitlines()[-1].strip() in text)
    proc = subprocess.run([sys.executable, "-m", "hw2.check"], cwd=folder, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    said = proc.stdout.strip().splitlines()
    assert said[-1].startswith(last.format(line=line)), said
    assert not any(s.startswith("all checks passed") for s in said)


def test_the_project_as_shipped_passes_every_check_as_a_student_runs_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own thread count, as a student's
    proc = subprocess.run([sys.executable, "-m", "hw2.check"], cwd=project_copy(tmp_path / "project"),
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["ok the U-Net", "ok q_sample", "ok training", "ok sampling"]
    # one thread and a lower priority, as the system reports them: beside a training run it stalls neither
    niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + check.NICENESS)
    assert re.fullmatch(rf"all checks passed in \d+ s \(1 thread, niceness {niceness}; the full suite: python -m "
                        rf"pytest -q\)", lines[-1]), lines[-1]
