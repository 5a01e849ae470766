"""benchmarks/gpu_check.py, the prepared GPU check, runs its whole code path on the CPU (--dry-run)."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_the_gpu_check_runs_and_reports_every_precision(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float") or line.startswith("| bfloat")]
    assert [r.split(" | ")[0] for r in rows] == ["| float32", "| float16", "| bfloat16"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "yes" and cells[5] == "bitwise", row  # the loss falls; the CPU resumes bitwise
        assert float(cells[3]) > 0 and cells[4].endswith(" s")
    assert "--amp auto gives" in out
