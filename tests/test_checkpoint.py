"""Checkpoint files: atomic writes, refusal of code-carrying pickles, homework checkpoints."""
import os
import pickle

import pytest
import torch

from diffusion import Diffusion
from hw2.checkpoint import atomic_save, load_checkpoint, unet_state
from hw2.errors import UserError
from trainer import Trainer
from unet import Unet


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": RunsCode()}, f)
    with pytest.raises(UserError, match="refusing to load .*only load checkpoints you trust"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_files_give_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="unreadable or truncated|refusing"):
        load_checkpoint(path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ok.pt"
    atomic_save({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="no 'model' entry"):
        load_checkpoint(tmp_path / "other.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"model": {"v": torch.tensor(1)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_save({"model": {"v": torch.tensor(2)}}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["model"]["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_homework_checkpoints_load(tiny_config, tmp_path):
    """The homework saved {"step", "model": Diffusion.state_dict()}."""
    torch.manual_seed(1)
    theirs = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10)
    path = tmp_path / "model-3.pt"
    torch.save({"step": 3000, "model": theirs.state_dict()}, path)

    torch.manual_seed(2)
    ours = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10)
    trainer = Trainer(ours, tiny_config, torch.zeros(8, 3, 18, 18, dtype=torch.uint8))
    trainer.load(path)
    assert trainer.step == 3000
    for k, v in theirs.model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[k], v)
    assert unet_state(theirs.state_dict()).keys() == theirs.model.state_dict().keys()


def test_every_random_state_round_trips_through_a_checkpoint(tiny_config, tmp_path):
    import random

    import numpy as np

    trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10), tiny_config,
                      torch.randint(0, 255, (8, 3, 18, 18), dtype=torch.uint8))
    trainer.save(tmp_path / "model-1.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), next(trainer.batches))
    torch.rand(5), np.random.rand(5), random.random(), next(trainer.batches)  # move every stream on
    trainer.load(tmp_path / "model-1.pt")
    got = (torch.rand(3), np.random.rand(3), random.random(), next(trainer.batches))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2] and torch.equal(got[3], expected[3])
