"""The prepared GPU scripts (benchmarks/gpu_check.py, benchmarks/levers.py --device cuda) run their
code paths on the CPU with --dry: gpu_check through the fake CUDA device (hw2/fast/fake_cuda.py),
so its captures are taken, replayed and drilled as on a GPU."""
import json
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import levers  # noqa: E402

from hw2 import fast  # noqa: E402


def section(out, name):
    """The text of the section called name in gpu_check's output."""
    return out.split(f"### {name}")[1].split("\n### ")[0]


def test_the_gpu_check_runs_every_section_prints_each_and_writes_them_all(capsys, tmp_path, monkeypatch):
    """Every section of the dry run, printed and in the JSON file; the bfloat16 comparison made to
    fail: its section says why, and every later section runs all the same."""
    compared = gpu_check.compared

    def failing_in_bf16(settings, device, dtype, workdir):
        if dtype == torch.bfloat16:
            raise RuntimeError("a section that fails")
        return compared(settings, device, dtype, workdir)

    monkeypatch.setattr(gpu_check, "compared", failing_in_bf16)
    assert gpu_check.main(["--dry", "--json", str(tmp_path / "gpu.json"), "--budget", "1e6"]) == 1
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "gpu.json").read_text())["sections"]
    assert [name.split(":")[0].split(" (")[0] for name in written] == [
        "what a failed capture leaves behind", "float32", "float16", "bfloat16", "the captured path, float32",
        "captured against eager, bfloat16", "drills", "the levers, eager and captured"]
    assert [name for name, s in written.items() if not s["ok"]] == ["captured against eager, bfloat16"]
    assert "RuntimeError: a section that fails" in section(out, "captured against eager, bfloat16")
    assert all(s["lines"][-1].endswith("MiB)") and "device memory" in s["lines"][-1] for s in written.values())

    probe = written["what a failed capture leaves behind (benchmarks/capture_probe.py)"]["data"]
    assert probe["capture"].startswith("RuntimeError: CUDA error: operation failed due to a previous error during capture")
    assert probe["inside"].startswith("RuntimeError: a value read on the host (.item())")
    assert probe["cause"].startswith("RuntimeError at benchmarks/capture_probe.py:")
    assert probe["after"]["a random draw"].startswith("Offset increment outside graph capture")
    assert probe["after"]["synchronizing"] is None and probe["recovered"] is False

    for label in ("float32", "float16", "bfloat16"):
        rows = [line for line in section(out, label).splitlines() if line.startswith("| ")]
        columns = [c.strip() for c in rows[0].strip("|").split("|")]
        cells = dict(zip(columns, (c.strip() for c in rows[2].strip("|").split("|"))))
        assert cells["loss falls"] == "yes", rows
        before, joined = (float(cells[k].split()[0]) for k in ("eager before, ms (kernels)", "eager, ms (kernels)"))
        assert before > 0 and joined > 0
        captured = cells["captured, ms (kernels)"]  # float16's loss scaling is never captured
        assert captured == "not captured" if label == "float16" else float(captured.split()[0]) > 0
        assert cells["4 images, eager / captured"].endswith(" s (differ by 0e+00)")
    assert "--amp auto gives" in out and "fastest:" in out and "torch " in out

    path = section(out, "the captured path, float32")
    assert "8 steps from one seed, eager / captured (captured from step 4), largest relative difference 0.0e+00" in path
    assert "its first replay agreed with an eager step from the same state to 0.0e+00" in path
    assert "stopped after 2 steps and resumed for 4: the device generator equal, exactly" in path
    assert "resumed from a CPU run's checkpoint: captured (Adam capturable=True, fused=True)" in path
    assert ("a hook that reads a value on the host: the training step eager (a graph cannot hold a value read on the "
            "host at benchmarks/gpu_check.py:") in path
    assert "the note printed 1 time(s), losses equal to the eager run's (largest relative difference 0.0e+00)" in path

    drills = written["drills: edits of unet.py through main.py, --cuda_graph True (benchmarks/drills.py)"]["data"]
    assert not any(d["traceback"] for d in drills.values())
    backward, forward, sampling, inside = (drills[name] for name in (
        "a read in backward", "a read in forward", "a read only while sampling", "a read only inside a capture"))
    assert backward["exit"] == forward["exit"] == sampling["exit"] == 0
    assert len(backward["notes"]) == len(forward["notes"]) == len(sampling["notes"]) == 1
    assert backward["paths"][0].startswith("the training step eager") and backward["paths"][1].startswith("sampling captured")
    assert [p.split(" (")[0] for p in forward["paths"]] == ["the training step eager", "sampling eager"]
    assert sampling["paths"][0].startswith("the training step captured") and sampling["paths"][1].startswith("sampling eager")
    assert inside["exit"] == 1 and inside["error"].startswith(  # the fake fails as torch 2.11 and older
        "error: the training step could not be captured in a CUDA graph: its capture failed (RuntimeError at unet.py:")
    assert "the GPU did not recover (a random draw: " in inside["error"]

    for mode in ("eager", "captured"):
        table = out.split(f"### Levers, float32, {mode}, one repetition")[1].split("###")[0]
        names = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines()
                 if line.startswith("| ") and not line.startswith(("| ---", "| configuration"))]
        cuda_levers = [x for x in fast.LEVERS if x not in fast.CPU_LEVERS and x != "captured_sampling"]
        assert sorted(names) == sorted(["every lever", "plain network"] + [f"without {x}" for x in cuda_levers])


def test_a_gpu_check_section_that_would_overrun_the_budget_is_skipped_and_said(capsys, tmp_path):
    sections = gpu_check.Sections(torch.device("cpu"), "here", tmp_path / "gpu.json", budget=10)
    ran = []
    with gpu_check.cuda.use(gpu_check.FakeCuda()):
        assert sections.run("cheap", lambda: (ran.append(1) or ["done"], True, {}), estimate=5)
        assert sections.run("dear", lambda: (ran.append(2) or ["done"], True, {}), estimate=30) is None
    assert ran == [1]
    assert "skipped: 0 s of the 10 s budget spent, and it takes about 30 s" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu.json").read_text())["sections"]["dear"]["ok"] is None


def test_the_levers_benchmark_measures_each_lever_once_per_precision(capsys, monkeypatch):
    """Every lever that applies on a CPU left out once, beside every lever and the plain network;
    --amp both measures a precision once where auto and off agree (a CPU without bf16)."""
    monkeypatch.setattr(levers, "amp_dtype", lambda choice, device: None)  # auto gives float32, as without bf16
    assert levers.main(["--dry"]) == 0
    out = capsys.readouterr().out
    assert out.count("### ") == 1 and "### float32 (--amp auto)" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    names = [row[0].removeprefix("| ").split(",")[0] for row in rows[1:]]
    expected = ["every lever", "plain network"] + [f"without {x}" for x in fast.LEVERS if x != "captured_sampling"]
    assert sorted(names) == sorted(expected)
    for row in rows[1:]:
        assert float(row[1]) > 0 and float(row[2]) > 0, row
