"""The prepared GPU scripts (benchmarks/gpu_check.py, benchmarks/levers.py --device cuda) run their
code paths on the CPU with --dry: gpu_check through the fake CUDA device (hw2/fast/fake_cuda.py),
so its captures are taken, replayed and drilled as on a GPU."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import levers  # noqa: E402

from hw2 import fast  # noqa: E402


def test_the_gpu_check_runs_and_reports_every_precision_the_captured_path_and_the_levers(capsys):
    assert gpu_check.main(["--dry"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| precision"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in out.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    assert [r.split(" | ")[0] for r in rows] == ["| float32", "| float16", "| bfloat16"]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        assert cells["loss falls"] == "yes", row
        before, joined = (float(cells[k].split()[0]) for k in ("eager before, ms (kernels)", "eager, ms (kernels)"))
        assert before > 0 and joined > 0
        captured = cells["captured, ms (kernels)"]  # float16's loss scaling is never captured
        assert captured == "not captured" if row.startswith("| float16") else float(captured.split()[0]) > 0
        assert cells["4 images, eager / captured"].endswith(" s (differ by 0e+00)")
    assert "--amp auto gives" in out and "fastest:" in out and "torch " in out
    assert "8 steps from one seed, eager / captured (captured from step 4), largest relative difference 0.0e+00" in out
    assert "stopped after 2 steps and resumed for 4: the device generator equal, exactly" in out
    assert "resumed from a CPU run's checkpoint: captured (Adam capturable=True, fused=True)" in out
    assert ("drill, a layer that reads a value on the host: eager after the failed capture (RuntimeError: reading a "
            "value on the host") in out and "the note printed 1 time(s), losses equal to the eager run's (largest relative difference 0.0e+00)" in out
    assert "captured path: all as expected" in out
    for mode in ("eager", "captured"):
        table = out.split(f"### Levers, float32, {mode}, one repetition")[1].split("###")[0]
        names = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| ---", "| configuration"))]
        cuda_levers = [x for x in fast.LEVERS if x not in fast.CPU_LEVERS and x != "captured_sampling"]
        assert sorted(names) == sorted(["every lever", "plain network"] + [f"without {x}" for x in cuda_levers])


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
