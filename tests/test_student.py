"""What a student meets on the command line: a finished run left as it is, milestones that say
what they wrote, the first real problem reported first."""
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
    assert f"python main.py --load_path {out} --train_steps 1002" in said and "training completed" not in said
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
