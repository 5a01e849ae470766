"""What a student meets on the command line: a finished run left as it is, milestones that say
what they wrote, the first real problem reported first."""
import subprocess
from pathlib import Path

import main
from test_cli import TINY


def base(image_root, tmp_path, *extra):
    return [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"), "--save_folder",
            str(tmp_path / "run"), *extra]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_says_so_and_touches_nothing(image_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main.main(base(image_root, tmp_path, "--train_steps", "2", "--save_and_sample_every", "2")) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--wandb", "offline"]) == 0
    said = capsys.readouterr().out
    assert "is finished: it reached step 2 of --train_steps 2; nothing was changed" in said
    assert f"To train it as long again: python main.py --load_path {out} --train_steps 4 (any number above 2)" in said
    assert "training completed" not in said
    assert snapshot(out) == before  # not a byte changed, no W&B run started
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--train_steps", "3"]) == 0
    assert "training completed: step 3 of 3" in capsys.readouterr().out  # further, when asked


def test_each_milestone_says_what_it_wrote(image_root, tmp_path, capsys):
    assert main.main(base(image_root, tmp_path, "--train_steps", "4", "--save_and_sample_every", "2")) == 0
    said = capsys.readouterr().out
    for m, step in ((1, 2), (2, 4)):
        assert f"step {step}: saved model-{m}.pt and the grid sample-{m}.png" in said, said
        assert (tmp_path / "run" / f"model-{m}.pt").is_file() and (tmp_path / "run" / f"sample-{m}.png").is_file()


def test_a_missing_data_folder_is_reported_before_an_occupied_save_folder(image_root, tmp_path, capsys):
    assert main.main(base(image_root, tmp_path, "--train_steps", "1")) == 0
    capsys.readouterr()
    missing = tmp_path / "nowhere"
    assert main.main([*base(image_root, tmp_path, "--train_steps", "1"), "--data_path", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"data folder {missing} does not exist" in err and "already holds a run" not in err


def in_a_shell(words):
    """What bash hands a command given `words` (a sync line's arguments): its arguments, one a line."""
    return subprocess.run(["bash", "-c", f"printf '%s\\n' {words}"], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_every_command_on_a_run_folder_logs_to_one_wandb_run(image_root, tmp_path, capsys):
    """Offline: the first command keeps the run's id in the folder, a resume and --sample continue
    that run (each writes a part of it, which wandb sync uploads in order), and the sync line
    names every part, pasted into a shell as it is, whatever spaces the folder's path holds."""
    from wandb_records import logged

    out = tmp_path / "my runs" / "run 1"
    assert main.main(base(image_root, tmp_path, "--train_steps", "2", "--wandb", "offline", "--save_folder",
                          str(out))) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert in_a_shell(first.split("wandb sync ")[1]) == [str(next((out / "wandb").glob("offline-run-*")))]
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--train_steps", "4",
                      "--wandb", "offline"]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    parts = sorted((out / "wandb").glob("offline-run-*"))
    assert len(parts) == 2
    run_id = (out / "wandb-run-id").read_text().strip()
    runs = [logged(next(part.glob("run-*.wandb"))) for part in parts]
    assert [run.run_id for run, _ in runs] == [run_id, run_id]
    assert [row["_step"] for row in runs[1][1] if "loss" in row] == [3, 4]  # the resume logs steps 3 and 4
    assert said[-1] == (f"  W&B logged offline (2 parts, one per command); upload it with: wandb sync "
                        f"'{out / 'wandb'}'/offline-run-*-{run_id}*")
    pattern = said[-1].split("wandb sync ")[1]
    assert list(map(Path, in_a_shell(pattern))) == parts  # what the shell hands wandb sync: every part, in order


def test_a_stopped_run_still_says_how_to_upload_what_it_logged(image_root, tmp_path, capsys, monkeypatch):
    import trainer

    real, calls = trainer.Trainer.train_step, []

    def stopped_at_the_second_step(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        return real(self)

    monkeypatch.setattr(trainer.Trainer, "train_step", stopped_at_the_second_step)
    assert main.main(base(image_root, tmp_path, "--train_steps", "4", "--wandb", "offline")) == 130
    said = capsys.readouterr()
    part = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert f"  W&B logged offline; upload it with: wandb sync {part}" in said.out
    assert "interrupted at step 1" in said.err


def test_too_large_a_batch_is_refused_before_anything_is_created_even_with_the_images_cached(image_root, tmp_path,
                                                                                              capsys):
    assert main.main(base(image_root, tmp_path, "--train_steps", "1", "--save_folder", str(tmp_path / "first"))) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main.main(base(image_root, tmp_path, "--train_steps", "1", "--batch_size", "13", "--wandb", "offline")) == 1
    err = capsys.readouterr().err
    assert "the dataset has 12 usable images, fewer than one batch of 13" in err
    assert not out.exists()  # no save folder, no W&B run


def test_an_error_found_before_training_comes_alone_and_the_settings_once_the_run_starts(image_root, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main.main([*base(image_root, tmp_path, "--train_steps", "1"), "--data_path", str(missing)]) == 1
    said = capsys.readouterr()
    assert said.out == "" and said.err.startswith(f"error: data folder {missing} does not exist")
    assert len(said.err.strip().splitlines()) == 1
    assert main.main(base(image_root, tmp_path, "--train_steps", "1")) == 0
    out = capsys.readouterr().out
    assert out.startswith("config:\n") and "  (running on cpu, " in out


def test_too_few_images_for_a_batch_is_reported_alone(image_root, tmp_path, capsys):
    assert main.main(base(image_root, tmp_path, "--train_steps", "1", "--batch_size", "13")) == 1
    said = capsys.readouterr()
    assert said.out == "" and "fewer than one batch of 13" in said.err
