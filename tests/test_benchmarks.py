"""The prepared GPU scripts (benchmarks/gpu_check.py, benchmarks/levers.py --device cuda) run their
code paths on the CPU with --dry: all but the CUDA branches, which need a GPU."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402
import levers  # noqa: E402

from hw2 import fast  # noqa: E402


def test_the_gpu_check_runs_and_reports_every_precision(capsys):
    assert gpu_check.main(["--dry"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| precision"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = [line for line in out.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    assert [r.split(" | ")[0] for r in rows] == ["| float32", "| float16", "| bfloat16"]
    for row in rows:
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        assert cells["loss falls"] == "yes" and cells["resume"] == "bitwise", row  # the CPU resumes bitwise
        before, joined = (float(cells[k].split()[0]) for k in ("eager before, ms (kernels)", "eager, ms (kernels)"))
        assert before > 0 and joined > 0
        assert cells["captured, ms (kernels)"] == "not captured"  # no CUDA graphs on a CPU
        assert cells["8 images, eager / captured"].endswith(" s (differ by 0e+00)")  # no capture on a CPU
    assert "--amp auto gives" in out and "fastest:" in out


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
