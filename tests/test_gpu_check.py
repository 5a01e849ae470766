"""benchmarks/gpu_check.py, the prepared GPU check, runs its whole code path on the CPU (--dry)."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


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
