"""The EMA of the weights and DDIM sampling, through the trainer and the command line."""
import torch
from torch import nn

import main
from hw2.data import split_heldout
from hw2.ema import EMA
from hw2.runlog import read_metrics
from test_cli import TINY


def test_ema_update_is_the_moving_average():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    start = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for s, e, p in zip(start, ema.model.parameters(), model.parameters()):
        assert torch.allclose(e, 0.9 * s + 0.1 * p)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_ema_and_ddim_train_sample_and_resume_exactly(image_root, tmp_path):
    base = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "c"), "--save_and_sample_every", "2",
            "--ema_decay", "0.9", "--sampling_timesteps", "3", "--amp", "off"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main.main([*base, "--save_folder", str(one), "--train_steps", "4"]) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "2"]) == 0
    assert main.main([*base, "--save_folder", str(two), "--train_steps", "4", "--load_path", str(two / "model-latest.pt")]) == 0
    a = torch.load(one / "model-latest.pt", weights_only=True)
    b = torch.load(two / "model-latest.pt", weights_only=True)
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["ema"])  # an average, not a copy
    assert (one / "sample-2.png").is_file() and len(list((one / "sample_ddpm_2").glob("*.png"))) == 4


def test_heldout_loss_is_logged_at_milestones(image_root, tmp_path, capsys):
    out = tmp_path / "r"
    base = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "c"), "--save_folder", str(out)]
    assert main.main([*base, "--train_steps", "4", "--save_and_sample_every", "2", "--heldout_images", "3"]) == 0
    rows = read_metrics(out)
    heldout = [(r["step"], r["heldout_loss"]) for r in rows if r["heldout_loss"] is not None]
    assert [s for s, _ in heldout] == [2, 4] and all(0 < v < 2 for _, v in heldout)
    assert all(r["loss"] is not None for r in rows)
    assert main.main([*base, "--heldout_images", "12", "--save_folder", str(tmp_path / "r2")]) == 1
    assert "--heldout_images 12 leaves no image to train on" in capsys.readouterr().err


def test_the_heldout_split_is_fixed_and_disjoint():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4)
    train, held = split_heldout(images, 3, seed=5)
    train2, held2 = split_heldout(images, 3, seed=5)
    assert torch.equal(held, held2) and torch.equal(train, train2)
    ids = lambda x: set(x[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(ids(held)) == 3 and not ids(held) & ids(train) and len(ids(train)) == 7
