"""A run folder's life as a user lives it: never clobbered, resumed, visualized and sampled
from the checkpoint alone, and nothing left behind by a start that fails."""
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from PIL import Image

import main
from conftest import ROOT
from hw2.checkpoint import load_checkpoint
from hw2.runlog import read_metrics
from test_cli import TINY


def cli(*args, env=None):
    """python main.py ARGS, as the user types it."""
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def base(image_root, tmp_path, folder="run"):
    return [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"), "--wandb", "disabled",
            "--save_folder", str(tmp_path / folder)]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_never_replaces_another(image_root, tmp_path):
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "4", "--save_and_sample_every", "2"]) == 0
    before = snapshot(out)
    for steps in ("2", "1"):  # fewer steps: would replace metrics.csv and some checkpoints, and mix the rest
        proc = cli(*base(image_root, tmp_path), "--train_steps", steps, "--save_and_sample_every", "1")
        assert proc.returncode == 1, proc.stderr
        error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and "already holds a run (checkpoints up to model-2.pt, metrics.csv)" in error[0]
        assert f"python main.py --load_path {out / 'model-latest.pt'}" in error[0] and "--overwrite" in error[0]
        assert snapshot(out) == before  # not a byte changed

    (out / "notes.txt").write_text("the user's own file")
    assert main.main([*base(image_root, tmp_path), "--train_steps", "1", "--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["loss.png", "metrics.csv", "model-latest.pt", "notes.txt", "sample-final.png"]
    assert [r["step"] for r in read_metrics(out)] == [1]
    assert load_checkpoint(out / "model-latest.pt")["step"] == 1


def test_resume_visualize_and_sample_need_only_the_run_folder(image_root, tmp_path):
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "2", "--save_and_sample_every", "2",
                      "--ema_decay", "0.9", "--batch_size", "3"]) == 0

    proc = cli("--load_path", out, "--train_steps", "4", "--cache_dir", tmp_path / "cache")  # extends the run; everything else from the checkpoint
    assert proc.returncode == 0, proc.stderr
    assert "  batch_size: 3  *" in proc.stdout and "  ema_decay: 0.9  *" in proc.stdout
    assert "  train_steps: 4\n" in proc.stdout and f"(marked *: from {out / 'model-latest.pt'})" in proc.stdout
    assert load_checkpoint(out / "model-latest.pt")["step"] == 4
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert "1,0." in (out / "metrics.csv").read_text()  # integer steps, also in rows read back at resume

    proc = cli("--load_path", out / "model-latest.pt", "--visualize", "--cache_dir", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    assert (out / "forward_diffusion.png").is_file() and (out / "backward_diffusion.png").is_file()

    proc = cli("--load_path", out, "--cache_dir", tmp_path / "cache", "--sample", "5", "--seed", "7", "--sampling_timesteps", "3")
    assert proc.returncode == 0, proc.stderr
    folder = out / "samples-step4-seed7"
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert Image.open(out / "samples-step4-seed7.png").size == (2 + 2 * 18, 2 + 2 * 18)  # the first 4, 2 x 2
    assert "sampling 5 images" in proc.stderr  # the progress bar
    assert (f"wrote 5 images to {folder}/ and a grid of 4 to {out / 'samples-step4-seed7.png'} (--num_samples 4, "
            f"the run's; --num_samples N for another)") in proc.stdout  # the grid's size, and where it came from


def test_sample_uses_the_ema_weights_the_seed_and_ddim(image_root, tmp_path, monkeypatch, capsys):
    """(And its grid shows all 4 images drawn, as many as the run's --num_samples 4: nothing to say of
    where the grid's size came from.)"""
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "2", "--ema_decay", "0.5"]) == 0
    drawn = {}
    real = main.generate

    def spy(sampler, n, seed, *args, **kwargs):
        drawn.update(sampler=sampler, seed=seed, steps=sampler.sampling_timesteps)
        return real(sampler, n, seed, *args, **kwargs)

    monkeypatch.setattr(main, "generate", spy)
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--sample", "4", "--seed", "5", "--sampling_timesteps", "2"]) == 0
    said = capsys.readouterr().out
    assert f"wrote 4 images to {out / 'samples-step2-seed5'}/ and a grid of 4 to {out / 'samples-step2-seed5.png'}\n" \
        in said
    ema = load_checkpoint(out / "model-latest.pt")["ema"]
    weights = drawn["sampler"].model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in ema.items()) and drawn["seed"] == 5 and drawn["steps"] == 2
    first = [Image.open(p).tobytes() for p in sorted((out / "samples-step2-seed5").iterdir())]
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--sample", "4", "--seed", "5", "--sampling_timesteps", "2",
                      "--save_folder", str(tmp_path / "again")]) == 0
    again = [Image.open(p).tobytes() for p in sorted((tmp_path / "again" / "samples-step2-seed5").iterdir())]
    assert first == again  # seeded


def test_flags_given_override_the_checkpoint_and_the_model_may_not_change(image_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "1"]) == 0
    moved = tmp_path / "moved"
    image_root.rename(moved)
    capsys.readouterr()
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--visualize"]) == 1
    assert f"data folder {image_root} does not exist" in capsys.readouterr().err
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--visualize", "--data_path", str(moved)]) == 0
    assert f"  data_path: {moved}\n" in capsys.readouterr().out  # given, so not marked as the checkpoint's
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--unet_dim", "16", "--train_steps", "2"]) == 1
    assert "was trained with a different model: --unet_dim 16 here but 8 in the checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--data_path", "{tmp}/missing"], "data folder"),
    (["--load_path", "{tmp}/missing.pt"], "does not exist"),
    (["--fid", "--inception_path", "{tmp}/missing.pt"], "--inception_path points at"),
    (["--batch_size", "13"], "fewer than one batch of 13"),
    pytest.param(["--save_folder", "/proc/hw2-run"], "cannot write to --save_folder /proc/hw2-run (No such file",
                 marks=pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc here")),
])
def test_a_failed_start_creates_nothing(image_root, tmp_path, flags, message, capsys, monkeypatch):
    """Each mistake is reported alone, before the settings are printed, and nothing is created."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    args = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "cache"), "--save_folder", str(out),
            *[f.format(tmp=tmp_path) for f in flags]]
    assert main.main(args) == 1
    printed = capsys.readouterr()
    assert message in printed.err and "config:" not in printed.out
    assert not out.exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("typed,suggestion", [("--trian_steps", "--train_steps"), ("--lear", "--learning_rate"),
                                              ("--image", "--image_size")])
def test_flags_are_never_matched_by_prefix_and_typos_get_a_suggestion(typed, suggestion, capsys):
    with pytest.raises(SystemExit) as exit:
        main.parse_config([typed, "3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"unknown flag {typed}; did you mean {suggestion}" in err[0]


def test_the_run_ends_with_a_summary_and_wandb_goes_where_wandb_dir_says(image_root, tmp_path):
    elsewhere = tmp_path / "wandb-files"
    env = {**os.environ, "WANDB_DIR": str(elsewhere), "WANDB_MODE": "offline"}
    args = [*base(image_root, tmp_path)[:-4], "--save_folder", tmp_path / "run", "--train_steps", "2",
            "--save_and_sample_every", "2", "--wandb", "auto"]
    proc = cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("training completed: step 2 of 2, final loss 0.")
    assert f"in {tmp_path / 'run'}: model-latest.pt (continue with: python main.py --load_path {tmp_path / 'run'}" \
           in last[1] and "sample-final.png, loss.png, metrics.csv" in last[1]
    runs = list((elsewhere / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and last[2] == f"  W&B logged offline; upload it with: wandb sync {runs[0]}"
    assert not (tmp_path / "run" / "wandb").exists()


def test_the_final_grid_reuses_the_last_milestones_samples(image_root, tmp_path, monkeypatch):
    import trainer as trainer_module

    calls = []
    real = trainer_module.generate
    monkeypatch.setattr(trainer_module, "generate", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "4", "--save_and_sample_every", "2"]) == 0
    assert calls == [4, 4]  # two milestones, and no third sampling for the final grid
    assert (out / "sample-final.png").read_bytes() == (out / "sample-2.png").read_bytes()
    assert main.main([*base(image_root, tmp_path, "other"), "--train_steps", "3", "--save_and_sample_every", "2"]) == 0
    assert calls == [4, 4, 4, 4]  # step 3 is no milestone: the final grid is drawn


def test_a_resume_from_an_earlier_checkpoint_drops_the_lost_runs_metrics_and_takes_a_new_rate(image_root, tmp_path):
    """metrics.csv may be ahead of the checkpoint a run resumes from (the run died between a
    flush and the next checkpoint): those rows belong to a lost run and are replaced. A
    --learning_rate given at the resume is used, not the rate in the saved optimizer state."""
    out = tmp_path / "run"
    assert main.main([*base(image_root, tmp_path), "--train_steps", "4", "--save_and_sample_every", "2"]) == 0
    lost = read_metrics(out)
    shutil.copyfile(out / "model-1.pt", out / "model-latest.pt")  # as if steps 3 and 4 were never saved
    assert main.main(["--load_path", str(out), "--cache_dir", str(tmp_path / "cache"), "--learning_rate", "0.01"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[:2]] == [r["loss"] for r in lost[:2]]  # kept as written
    assert rows[3]["loss"] != lost[3]["loss"]  # step 4 comes from the new run, at the new rate
    saved = load_checkpoint(out / "model-latest.pt")
    assert {g["lr"] for g in saved["optimizer"]["param_groups"]} == {0.01}  # the flag beat the saved state
