"""Checkpoint files: atomic writes, refusal of code-carrying pickles, homework checkpoints."""
import dataclasses
import os
import pickle

import pytest
import torch

import main
from conftest import golden_cases, needs_golden
from diffusion import Diffusion
from hw2.checkpoint import FORMAT, capture_rng, load_checkpoint, load_optimizer_state, restore_rng
from hw2.distributed import Processes
from hw2.files import torch_bytes, write_atomic
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


def test_a_torch_saved_checkpoint_that_carries_code_is_refused_as_such_on_the_command_line(tmp_path, capsys):
    """torch.save's zip format: torch's weights-only loader names the unsupported global, and the
    student reads that the file carries code, not that it is unreadable."""
    path = tmp_path / "model-latest.pt"
    torch.save({"format": FORMAT, "model": {"w": torch.randn(3)}, "step": 1, "extra": RunsCode()}, path)
    assert main.main(["--load_path", str(path), "--sample", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to load {path}: it holds objects other than tensors and plain values (")
    assert err.rstrip().endswith("only load checkpoints you trust") and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_unreadable_files_give_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match="unreadable or truncated|refusing"):
        load_checkpoint(path)


def test_any_file_that_is_not_a_checkpoint_is_one_line_whatever_torch_raises(tmp_path, capsys):
    """Random bytes (bare, behind a pickle header, behind a zip header) and a real checkpoint cut
    at many lengths: each is called unreadable or not a checkpoint, never code to distrust,
    never a traceback; a whole pickle that carries code still is refused as such."""
    import random

    whole = torch_bytes({"format": FORMAT, "model": {"w": torch.randn(300)}, "step": 3})
    files = [whole[:n] for n in range(0, len(whole), max(1, len(whole) // 40))]
    for i in range(120):
        rng = random.Random(i)
        files.append([b"", b"\x80\x02", b"PK\x03\x04"][i % 3] + rng.randbytes(rng.choice([1, 7, 64, 900, 5000])))
    for i, data in enumerate(files):
        path = tmp_path / f"file-{i}.pt"
        path.write_bytes(data)
        with pytest.raises(UserError) as error:
            load_checkpoint(path)
        assert "unreadable or truncated, or not a checkpoint" in str(error.value), (i, str(error.value))
    assert main.main(["--load_path", str(tmp_path / "file-50.pt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {tmp_path / 'file-50.pt'} is unreadable") and err.count("\n") == 1
    for protocol in (2, 4):
        with open(tmp_path / "evil.pt", "wb") as f:
            pickle.dump({"model": RunsCode()}, f, protocol=protocol)
        with pytest.raises(UserError, match="refusing to load .*only load checkpoints you trust"):
            load_checkpoint(tmp_path / "evil.pt")


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "ok.pt"
    write_atomic(path, torch_bytes({"model": {"w": torch.randn(1000)}}))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="unreadable or truncated"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_names_the_newest_one_beside_it_that_loads(tmp_path):
    good = torch_bytes({"model": {"w": torch.randn(1000)}, "step": 1})
    for name in ("model-1.pt", "model-2.pt", "model-latest.pt"):
        write_atomic(tmp_path / name, good)
    for name in ("model-2.pt", "model-latest.pt"):  # a run killed while the disk filled up
        (tmp_path / name).write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="unreadable or truncated") as error:
        load_checkpoint(tmp_path / "model-latest.pt")
    assert str(error.value).endswith(f". model-1.pt in the same folder loads: python main.py --load_path "
                                     f"{tmp_path / 'model-1.pt'}")
    (tmp_path / "model-1.pt").write_bytes(good[:100])
    with pytest.raises(UserError) as error:
        load_checkpoint(tmp_path / "model-latest.pt")
    assert "loads" not in str(error.value)  # none does: nothing is offered


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="no 'model' weights"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_failed_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    from hw2 import files

    path = tmp_path / "ckpt.pt"
    write_atomic(path, torch_bytes({"model": {"v": torch.tensor(1)}}))

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, torch_bytes({"model": {"v": torch.tensor(2)}}))
    monkeypatch.undo()
    assert load_checkpoint(path)["model"]["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_every_random_state_round_trips_through_a_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10), tiny_config,
                      torch.randint(0, 255, (8, 3, 18, 18), dtype=torch.uint8))
    trainer.save(tmp_path / "model-1.pt")
    expected = (torch.rand(3), next(trainer.batches))
    torch.rand(5), next(trainer.batches)  # move every stream on
    load(trainer, tmp_path / "model-1.pt")
    got = (torch.rand(3), next(trainer.batches))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def generator_after(seed, draws):
    torch.manual_seed(seed)
    torch.rand(draws)
    return torch.get_rng_state()


class FirstOfTwo(Processes):
    """Rank 0 of two processes, whose partner's CPU generator is in the state `other`."""

    other = None

    def __init__(self):
        super().__init__(rank=0, world=2)

    def gather(self, tensor):
        return torch.cat([tensor, self.other.unsqueeze(0)])


def test_each_process_saves_and_restores_its_own_generator():
    """The main process writes every process's random states, in rank order; at resume each
    process takes its own, and with another process count every one takes process 0's."""
    procs = FirstOfTwo()
    procs.other = generator_after(1, 7)
    torch.set_rng_state(generator_after(0, 3))
    rng = capture_rng("cpu", procs)
    assert [torch.equal(p["torch"], s) for p, s in zip(rng["processes"], (generator_after(0, 3), procs.other))] \
        == [True, True]
    for rank, expected in ((0, generator_after(0, 3)), (1, procs.other)):
        torch.manual_seed(99)
        assert restore_rng(rng, "cpu", Processes(rank=rank, world=2)) is None
        assert torch.equal(torch.get_rng_state(), expected)
    torch.manual_seed(99)
    note = restore_rng(rng, "cpu", Processes(rank=2, world=3))
    assert torch.equal(torch.get_rng_state(), generator_after(0, 3))
    assert note == ("note: the checkpoint holds the random states of 2 process(es), this run has 3: every process "
                    "continues process 0's")


def test_on_a_mac_the_mps_generator_is_saved_and_restored_as_a_gpus_is(monkeypatch):
    """(No Mac here: MPS's two generator calls are stood in for.)"""
    generator = {"state": torch.arange(8, dtype=torch.uint8)}
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: generator["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state: generator.update(state=state.clone()))
    rng = capture_rng("mps", Processes())
    assert torch.equal(rng["processes"][0]["mps"], torch.arange(8, dtype=torch.uint8))
    generator["state"] = torch.zeros(8, dtype=torch.uint8)
    assert restore_rng(rng, "mps", Processes()) is None
    assert torch.equal(generator["state"], torch.arange(8, dtype=torch.uint8))


def test_checkpoints_written_before_each_process_kept_its_own_generator_restore_it():
    torch.manual_seed(99)
    assert restore_rng({"torch": generator_after(0, 3), "cuda": []}, "cpu", Processes()) is None
    assert torch.equal(torch.get_rng_state(), generator_after(0, 3))


@pytest.mark.parametrize("saved,ours", [
    ({}, {"fused": True, "capturable": True}),  # a plain run's state into a captured one
    ({"fused": True, "capturable": True}, {}),  # and back
    ({"foreach": True}, {"fused": True}),
])
def test_an_optimizers_state_loads_its_values_and_keeps_this_runs_settings(saved, ours):
    """Adam's step count and moments come from the checkpoint; lr, fused, capturable and
    foreach stay as this run built them (torch's own load puts the saved ones back)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    before = torch.optim.Adam(params, lr=0.1, **saved)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(5)
        before.step()
    opt = torch.optim.Adam(params, lr=0.01, **ours)
    settings = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    load_optimizer_state(opt, before.state_dict())
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == settings
    for p in params:
        assert float(opt.state[p]["step"]) == 3.0
        assert torch.equal(opt.state[p]["exp_avg"], before.state[p]["exp_avg"])
        if ours.get("fused") or ours.get("capturable"):  # their step count is a float32 tensor on the device
            assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].device == p.device
    opt.step()  # and it steps


def load(trainer, path):
    trainer.load(load_checkpoint(path), path)


# The homework starter's checkpoints, built from the weights its own code produced

def starter_checkpoint(path, case, step=1234, layout="trainer"):
    """layout "trainer": what the starter's trainer saves, {"step", "model": Diffusion.state_dict()},
    with schedule buffers a student's Diffusion registered; "bare": the U-Net's state_dict alone."""
    if layout == "bare":
        torch.save(case["state_dict"], path)
        return path
    model = {f"model.{k}": v for k, v in case["state_dict"].items()}
    model.update(betas=torch.rand(50), alphas_cumprod=torch.rand(50), my_sqrt_alphas=torch.rand(50))
    torch.save({"step": step, "model": model}, path)
    return path


def golden_config(tiny_config, case):
    return dataclasses.replace(tiny_config, unet_dim=case["dim"], unet_dim_mults=tuple(case["dim_mults"]),
                               image_size=case["image_size"], time_steps=50)


@needs_golden
@pytest.mark.parametrize("layout", ["trainer", "bare"])
def test_starter_checkpoints_load_the_starters_function(tiny_config, tmp_path, layout, capsys):
    case = golden_cases()[1]
    path = starter_checkpoint(tmp_path / "model-7.pt", case, layout=layout)
    config = golden_config(tiny_config, case)
    diffusion = Diffusion(Unet(case["dim"], dim_mults=tuple(case["dim_mults"])), image_size=16, timesteps=50)
    trainer = Trainer(diffusion, config, torch.zeros(8, 3, 17, 17, dtype=torch.uint8))
    load(trainer, path)
    assert trainer.step == (1234 if layout == "trainer" else 0)
    with torch.no_grad():
        y = diffusion.model.eval()(case["x"], case["t"])
    assert (y - case["y"]).abs().max() < 1e-5
    assert "fresh optimizer" in capsys.readouterr().out


@needs_golden
@pytest.mark.parametrize("layout", ["trainer", "bare"])
def test_visualize_and_resume_from_starter_checkpoints(image_root, tmp_path, layout, capsys):
    case = golden_cases()[1]
    path = starter_checkpoint(tmp_path / f"{layout}.pt", case, step=3, layout=layout)
    args = ["--image_size", "16", "--unet_dim", "8", "--unet_dim_mults", "1", "2", "4", "--batch_size", "4",
            "--num_samples", "2", "--device", "cpu", "--data_path", str(image_root), "--cache_dir", str(tmp_path / "c"),
            "--save_folder", str(tmp_path / "out"), "--load_path", str(path)]
    assert main.main([*args, "--visualize"]) == 0
    assert (tmp_path / "out" / "backward_diffusion.png").is_file()
    out = capsys.readouterr().out
    assert f"loaded {path} (step {3 if layout == 'trainer' else 0})" in out
    if layout == "trainer":
        assert "ignored 3 tensor(s) of the checkpoint's Diffusion" in out and "alphas_cumprod" in out
    assert main.main([*args, "--train_steps", "4", "--save_and_sample_every", "4"]) == 0
    resumed = load_checkpoint(tmp_path / "out" / "model-latest.pt")
    assert resumed["step"] == 4
    moved = [k for k, v in case["state_dict"].items() if not torch.equal(resumed["model"][k], v)]
    assert moved  # one step of Adam from the starter's weights, not from a fresh model
    steps = 1 if layout == "trainer" else 4
    assert max((resumed["model"][k] - v).abs().max().item() for k, v in case["state_dict"].items()) < 0.002 * steps


@needs_golden
def test_a_checkpoint_of_another_size_names_the_flags(tiny_config, tmp_path):
    case = golden_cases()[0]  # dim 16, mults 1 2 4 8
    path = starter_checkpoint(tmp_path / "big.pt", case)
    trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2, 4)), image_size=16, timesteps=50),
                      golden_config(tiny_config, golden_cases()[1]), torch.zeros(8, 3, 17, 17, dtype=torch.uint8))
    with pytest.raises(UserError, match=r"trained with --unet_dim 16 --unet_dim_mults 1 2 4 8, this run builds "
                                        r"--unet_dim 8 --unet_dim_mults 1 2 4; pass the checkpoint's values"):
        load(trainer, path)


@needs_golden
def test_a_checkpoint_of_another_network_names_the_keys_not_the_flags(tiny_config, tmp_path):
    case = golden_cases()[1]
    state = dict(case["state_dict"])
    state["mid_attn.fn.norm.weight"] = state.pop("mid_attn.fn.norm.g").flatten()  # a GroupNorm in its place
    state["downs.0.2.fn.norm.bias"] = torch.zeros(8)
    state["final_conv.bias"] = torch.zeros(4)
    torch.save({"step": 1, "model": state}, tmp_path / "other.pt")
    trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2, 4)), image_size=16, timesteps=50),
                      golden_config(tiny_config, case), torch.zeros(8, 3, 17, 17, dtype=torch.uint8))
    with pytest.raises(UserError) as error:
        load(trainer, tmp_path / "other.pt")
    message = str(error.value)
    assert "1 weight(s) missing (mid_attn.fn.norm.g)" in message
    assert "2 unexpected (mid_attn.fn.norm.weight, downs.0.2.fn.norm.bias)" in message
    assert "final_conv.bias: (4,) in the file, (3,) here" in message
    assert "--unet_dim" not in message


def test_checkpoints_of_the_earlier_architecture_are_refused(tmp_path):
    model = {k: torch.zeros(1) for k in ("init_conv.weight", "mid_attn.fn.norm.weight", "mid_attn.fn.norm.bias")}
    torch.save({"step": 5, "model": model, "optimizer": {}, "config": {"unet_dim": 16}}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"earlier version of this project \(checkpoint format 1\).*cannot be "
                                        r"converted faithfully"):
        load_checkpoint(tmp_path / "old.pt")
    torch.save({"format": FORMAT + 1, "step": 5, "model": model}, tmp_path / "new.pt")
    with pytest.raises(UserError, match=f"format {FORMAT + 1}, newer than this version reads"):
        load_checkpoint(tmp_path / "new.pt")


def test_our_checkpoints_carry_the_format(tiny_config, tmp_path):
    trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10), tiny_config,
                      torch.zeros(8, 3, 18, 18, dtype=torch.uint8))
    trainer.save(tmp_path / "model-1.pt")
    assert torch.load(tmp_path / "model-1.pt", weights_only=True)["format"] == FORMAT


def test_every_checkpoint_after_a_resume_stores_the_whole_runs_elapsed_time(tiny_config, tmp_path, monkeypatch):
    """Trained 10 s, resumed for 5 s, resumed again for 3 s: the checkpoints store 10, 15 and 18 s,
    so that every later resume, not only the first, continues the clock."""
    clock = [0.0]
    monkeypatch.setattr("trainer.time.monotonic", lambda: clock[0])
    stored, previous = [], None
    for start, seconds in ((0.0, 10.0), (100.0, 5.0), (200.0, 3.0)):
        clock[0] = start
        trainer = Trainer(Diffusion(Unet(8, dim_mults=(1, 2)), image_size=16, timesteps=10), tiny_config,
                          torch.randint(0, 255, (8, 3, 18, 18), dtype=torch.uint8))
        if previous:
            load(trainer, previous)
        clock[0] += seconds
        previous = tmp_path / f"model-{len(stored) + 1}.pt"
        trainer.save(previous)
        stored.append(load_checkpoint(previous)["elapsed"])
    assert stored == [10.0, 15.0, 18.0]
