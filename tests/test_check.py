"""python -m hw2.check, the quick check after an edit: it passes on the project as it is, and
each kind of breakage it is for stops it with one line naming the check (and the line of
unet.py or diffusion.py where an error was raised)."""
import math

import diffusion
from hw2 import check


def test_the_project_as_it_is_passes_every_check(capsys):
    assert check.main() == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["ok the U-Net", "ok q_sample", "ok training", "ok sampling"]
    assert lines[-1].startswith("all checks passed in ")


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
