"""The captures as a student meets them, through the fake CUDA device: whole runs of the command
line (in this process, or as `python -m hw2.fast.fake_cuda main.py ...` on a copy of the project
with unet.py edited), with the fake failing as torch 2.11 and older do where a test says so."""
import re
import subprocess
import sys

import pytest
import torch

import main
from hw2 import precision
from hw2.fast import cuda, network
from hw2.fast.fake_cuda import FakeCuda
from hw2.fast.step import WARMUP_STEPS
from conftest import ROOT
from test_cli import tiny_args

sys.path.insert(0, str(ROOT / "benchmarks"))
from drills import EDITS, project_copy, visible  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_notes(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


def command(image_root, tmp_path, *extra):
    return [*tiny_args(image_root, tmp_path, "--train_steps", "6", "--save_and_sample_every", "3", "--amp", "off",
                       "--wandb", "disabled"), *extra]


def again(tmp_path):
    """The flags of a later command on the run in tmp_path/results."""
    return ["--load_path", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache")]


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.10.0+cu128", torch.__version__])
def test_a_run_captures_its_step_and_sampling_on_every_torch_requirements_allow(image_root, tmp_path, monkeypatch,
                                                                                 capsys, version):
    monkeypatch.setattr(torch, "__version__", version)
    with cuda.use(FakeCuda()) as fake:
        trainer = main.run(*main.parse_config(command(image_root, tmp_path)))
        print(main.summary(trainer))
    assert trainer.one_step.graph is not None and fake.captures == 2  # the step, and sampling's one pass shape
    out = capsys.readouterr().out
    assert "the training step in one CUDA graph, checked at first use)" in out
    assert ("  the training step captured in a CUDA graph after 3 eager warm-up steps; its first replay agreed with an "
            "eager step from the same state to 0.0e+00 (tolerance 1e-03)") in out
    assert "  sampling captured in CUDA graphs; the first replay agreed with an eager evaluation to 0.0e+00" in out


def test_cuda_graph_false_turns_off_every_capture(image_root, tmp_path, capsys):
    with cuda.use(FakeCuda()) as fake:
        trainer = main.run(*main.parse_config(command(image_root, tmp_path, "--cuda_graph", "False")))
        assert fake.captures == 0 and fake.replays == 0
        assert "captured_sampling" not in trainer.model.levers
        main.run(*main.parse_config([*again(tmp_path), "--sample", "4", "--cuda_graph", "False"]))
        assert fake.captures == 0
        main.run(*main.parse_config([*again(tmp_path), "--sample", "4"]))
        assert fake.captures == 1  # sampling, captured by default
    assert "the training step eager (--cuda_graph False)" in capsys.readouterr().out


def test_a_resumed_run_keeps_the_optimizer_it_built_and_captures(image_root, tmp_path):
    """A --plain run's checkpoint (plain Adam) resumed by a default run: fused Adam on a CPU, and
    with the fake CUDA device a capturable one whose step is captured; resumed again with
    --plain, the plain Adam again. The optimizer's settings are the run's, its values the
    checkpoint's."""
    out = tmp_path / "results"
    common = ["--cache_dir", str(tmp_path / "cache"), "--wandb", "disabled", "--amp", "off"]

    def run(*args, fake_device=False):
        with cuda.use(FakeCuda() if fake_device else cuda.Cuda()):
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


@pytest.fixture
def reads_while_sampling_is_captured(monkeypatch):
    """The network reads a value on the host while the fake device captures sampling, where the
    watched evaluation before it does not."""
    evaluate = network.FastUnet.evaluate

    def reads_in_capture(self, x, time):
        if getattr(cuda.calls(), "in_capture", False) and not torch.is_grad_enabled():
            x.sum().item()
        return evaluate(self, x, time)

    monkeypatch.setattr(network.FastUnet, "evaluate", reads_in_capture)


def errors(err):
    """The lines of stderr that are not a progress bar's (as a terminal shows them)."""
    assert "Traceback" not in err
    return [line for line in visible(err) if line.startswith(("error", "note"))]


def run_main(argv, recovers=False):
    """main.py's command line on a fresh fake device that does not recover (torch 2.11 and older)."""
    with cuda.use(FakeCuda(recovers=recovers)) as fake:
        return main.main(argv), fake


@pytest.mark.usefixtures("reads_while_sampling_is_captured")
def test_a_sampling_capture_that_breaks_the_device_is_one_line_on_every_path(image_root, tmp_path, capsys):
    """Milestone sampling in a training run, --sample and --visualize: one line each, saying what
    failed and the way on, never a traceback; the way on works."""
    assert run_main(command(image_root, tmp_path))[0] == 1
    err = errors(capsys.readouterr().err)
    results = tmp_path / "results"
    assert len(err) == 1 and re.fullmatch(
        r"error: sampling could not be captured in a CUDA graph: its capture failed \(RuntimeError at "
        r"tests/test_capture_runs.py:\d+: a value read on the host .*\), and the GPU did not recover \(a random "
        rf"draw: .*\)\); the run stopped. {results}/model-latest.pt holds step 3. Resume with: python main.py "
        rf"--load_path {results} --cuda_graph False", err[0]), err
    for job in (["--sample", "4"], ["--visualize"]):
        assert run_main([*again(tmp_path), *job])[0] == 1
        err = errors(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("error: sampling could not be captured in a CUDA graph: ") and \
            err[0].endswith("; nothing was lost. Run the same command again with --cuda_graph False"), err
        assert run_main([*again(tmp_path), *job, "--cuda_graph", "False"])[0] == 0
    status, fake = run_main([*again(tmp_path), "--cuda_graph", "False"])
    assert status == 0 and fake.captures == 0
    assert (results / "sample-1.png").is_file() and (results / "sample-2.png").is_file()


# a copy of the project with unet.py edited, run as a student runs it (python -m hw2.fast.fake_cuda main.py ...)

READ_IN_FORWARD = ("        x = self.init_conv(x)\n        r = x.clone()",
                   "        x = self.init_conv(x)\n        x.float().mean().item()\n        r = x.clone()")
READ_WHILE_SAMPLING = EDITS["a read only while sampling"][:2]
PRINT_IN_FORWARD = ("        x = self.init_conv(x)\n        r = x.clone()",
                    "        x = self.init_conv(x)\n        print('forward ran')\n        r = x.clone()")


def edited(tmp_path, edit):
    """A copy of the project with one edit of unet.py, and the line number of the edit's last new line."""
    folder = project_copy(tmp_path / "project", *edit)
    lines = (folder / "unet.py").read_text().splitlines()
    last = edit[1].splitlines()[-2]
    return folder, lines.index(last) + 1


def student(folder, image_root, tmp_path, *flags, old=True):
    """`python -m hw2.fast.fake_cuda [--old] main.py FLAGS` in folder: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "hw2.fast.fake_cuda", *(["--old"] if old else []), "main.py", *flags],
                          cwd=folder, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.returncode, proc.stdout, proc.stderr


def notes(err):
    return [line for line in errors(err) if line.startswith("note:")]


def test_an_edit_that_reads_the_host_in_forward_runs_eagerly_with_one_note(image_root, tmp_path):
    """By default an edited unet.py runs eagerly and the start-up line says why; with
    --cuda_graph True the watched step finds the read, names its line, and no capture is tried,
    so even a torch that cannot recover from a failed capture finishes the run."""
    folder, line = edited(tmp_path, READ_IN_FORWARD)
    rc, out, err = student(folder, image_root, tmp_path, *command(image_root, tmp_path))
    assert rc == 0 and err.endswith("fake CUDA device: 0 captures, 0 replays\n")
    assert ("the training step eager (unet.py was edited, so the model's Python (a print, a counter) runs at every "
            "step; --cuda_graph True captures it, and then that Python runs only while it is captured))") in out
    assert notes(err) == []
    rc, out, err = student(folder, image_root, tmp_path, *command(image_root, tmp_path, "--overwrite", "--cuda_graph",
                                                                   "True"))
    assert rc == 0 and err.endswith("fake CUDA device: 0 captures, 0 replays\n")
    assert notes(err) == ["note: the training step runs eagerly, not in a CUDA graph: a graph cannot hold a value read "
                          f"on the host (.item()) at unet.py:{line}"]
    assert f"  the training step eager (a graph cannot hold a value read on the host (.item()) at unet.py:{line})" in out


def test_an_edit_that_reads_the_host_only_while_sampling_captures_the_step_and_samples_eagerly(image_root, tmp_path):
    folder, line = edited(tmp_path, READ_WHILE_SAMPLING)
    rc, out, err = student(folder, image_root, tmp_path, *command(image_root, tmp_path, "--cuda_graph", "True"))
    assert rc == 0 and "fake CUDA device: 1 captures," in err
    assert notes(err) == ["note: sampling runs eagerly, not in a CUDA graph: a graph cannot hold a value read on the "
                          f"host (.item()) at unet.py:{line}"]
    assert "  the training step captured in a CUDA graph" in out and "  sampling eager (a graph cannot hold" in out
    for job in (["--sample", "4"], ["--visualize"]):
        rc, out, err = student(folder, image_root, tmp_path, *again(tmp_path), "--cuda_graph", "True", *job)
        assert rc == 0 and err.endswith("fake CUDA device: 0 captures, 0 replays\n") and len(notes(err)) == 1


def test_a_print_in_the_edited_model_runs_at_every_step_by_default(image_root, tmp_path):
    """What a student debugging with print expects: as many prints as an eager run makes; with
    --cuda_graph True (as the start-up line warns) fewer, none at a replay."""
    folder, _ = edited(tmp_path, PRINT_IN_FORWARD)
    counts = {}
    for flag in ("False", None, "True"):
        extra = ["--overwrite"] + (["--cuda_graph", flag] if flag else [])
        rc, out, err = student(folder, image_root, tmp_path, *command(image_root, tmp_path, *extra), old=False)
        assert rc == 0
        counts[flag] = out.count("forward ran")
    assert counts[None] == counts["False"] > counts["True"] > 0
