"""metrics.csv: rows appended as training goes (not the file rewritten), rewritten whole only where a
written row changes, and a line cut short by a kill left out."""
import dataclasses

from hw2 import runlog
from hw2.runlog import RunLog, read_metrics


def test_rows_are_appended_and_the_file_is_rewritten_only_when_a_written_row_changes(tiny_config, monkeypatch):
    """Each step's row is in metrics.csv as soon as it is logged (tail -f shows every step), appended;
    a milestone's FID joining its step's row rewrites the file once."""
    config = dataclasses.replace(tiny_config, wandb="disabled")
    rewrites = []
    real = runlog.write_atomic
    monkeypatch.setattr(runlog, "write_atomic", lambda path, data: rewrites.append(path) or real(path, data))
    log = RunLog(config, "disabled")
    log.truncate(0)  # what a run does first: one rewrite
    for step in range(1, 8):
        log.log({"loss": 1.0 / step}, step, elapsed=step)
        assert [r["step"] for r in read_metrics(config.save_folder)] == list(range(1, step + 1))
    assert len(rewrites) == 1
    log.log({"fid": 12.5}, 7, elapsed=7.5)  # joins step 7's written row: rewritten once, at once
    assert len(rewrites) == 2 and read_metrics(config.save_folder)[-1]["fid"] == 12.5
    log.log({"heldout_loss": 0.25}, 7, elapsed=7.5)
    assert len(rewrites) == 3 and read_metrics(config.save_folder)[-1]["heldout_loss"] == 0.25
    log.finish()
    rows = read_metrics(config.save_folder)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["fid"] == 12.5 and rows[-1]["loss"] == 1 / 7
    text = (log.path).read_text()
    assert text.count("\n7,") == 1 and text.startswith("step,loss,fid,heldout_loss,elapsed_s\n")


def test_a_line_cut_short_by_a_kill_is_left_out_and_the_next_run_rewrites_the_file(tiny_config):
    config = dataclasses.replace(tiny_config, wandb="disabled")
    log = RunLog(config, "disabled")
    log.truncate(0)
    for step in (1, 2):
        log.log({"loss": 0.5}, step, elapsed=step)
    log.flush()
    with open(log.path, "a") as f:
        f.write("3,0.4")  # half of step 3's line, as a kill in the middle of an append leaves it
    assert [r["step"] for r in read_metrics(config.save_folder)] == [1, 2]
    again = RunLog(config, "disabled")  # a resume: the cut line goes, and later rows follow whole lines
    again.log({"loss": 0.3}, 3, elapsed=3.0)
    again.flush()
    assert [r["step"] for r in read_metrics(config.save_folder)] == [1, 2, 3]
    assert again.path.read_text().endswith("\n3,0.3,,,3.0\n")
