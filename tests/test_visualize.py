"""The forward and backward diffusion figures (the homework's Figures 3 and 4)."""
import torch
from PIL import Image

import main
from diffusion import Diffusion
from hw2.visualize import backward_images, forward_images, step_indices
from test_cli import TINY
from test_diffusion import ConstantNoise
from wandb_records import logged


def test_step_indices():
    assert step_indices(50) == [0, 12, 25, 37, 49]
    assert step_indices(1000) == [0, 250, 500, 750, 990]
    assert step_indices(1) == [0, 0, 0, 0, 0]


def test_backward_starts_from_the_noise_itself_and_runs_the_chain():
    d = Diffusion(ConstantNoise(0.1), image_size=8, timesteps=20)
    ts = step_indices(20)  # [0, 5, 10, 15, 19]
    x_0 = torch.rand(2, 3, 8, 8) * 2 - 1
    g = torch.Generator().manual_seed(0)
    forward = forward_images(d, x_0, ts, g)
    assert forward[-1].min() < -1 or forward[-1].max() > 1  # noise, in the model's scale
    backward = backward_images(d, forward[-1], ts, torch.Generator().manual_seed(1))
    assert torch.equal(backward[-1], forward[-1])

    x, g = forward[-1], torch.Generator().manual_seed(1)
    states = {}
    for i in reversed(range(20)):
        x = d.p_sample(x, torch.full((2,), i), i, generator=g)
        states[i - 1] = x
    assert torch.equal(backward[ts.index(10)], states[10])
    assert torch.equal(backward[0], x)  # the 0 % column is the chain's final output


def test_visualize_from_a_checkpoint(image_root, tmp_path, capsys):
    out = tmp_path / "results"
    base = [*TINY, "--data_path", str(image_root), "--save_folder", str(out), "--cache_dir", str(tmp_path / "c")]
    assert main.main([*base, "--train_steps", "2", "--save_and_sample_every", "2"]) == 0
    capsys.readouterr()
    assert main.main([*base, "--visualize", "--load_path", str(out / "model-latest.pt"), "--wandb", "offline"]) == 0
    assert "backward diffusion:" in capsys.readouterr().err  # the reverse chain shows its progress
    for name in ("forward_diffusion.png", "backward_diffusion.png"):
        w, h = Image.open(out / name).size
        assert w > 5 * 100 and h > 4 * 100  # 5 labelled columns, 4 image rows
    _, history = logged(next(out.glob("wandb/offline-run-*/run-*.wandb")))
    keys = {k.split("/")[0] for row in history for k in row}
    assert {"forward_diffusion", "backward_diffusion"} <= keys


def test_the_figures_noise_each_t_afresh_and_denoise_from_the_forwards_last_column(image_root, tmp_path, monkeypatch):
    """What visualize() hands the two figures: the backward figure starts from the very image the
    forward one ends on (99 %), and each forward column has noise of its own (the noise implied
    by x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps is uncorrelated between columns)."""
    import dataclasses

    from hw2 import visualize as vis
    from hw2.config import Config
    from hw2.data import Batches, training_data

    config = Config(data_path=str(image_root), image_size=16, time_steps=20, batch_size=8, save_folder=str(tmp_path),
                    cache_dir=str(tmp_path / "c"))
    _, images = training_data(config, progress=False)
    d = Diffusion(ConstantNoise(0.1), image_size=16, timesteps=20)
    drawn = {}
    monkeypatch.setattr(vis, "figure", lambda columns, labels, title, path: drawn.setdefault(title, columns) and path)
    vis.visualize(d, d, images, dataclasses.replace(config))
    forward, backward = drawn["Forward diffusion q(x_t | x_0)"], drawn["Backward diffusion p(x_{t-1} | x_t)"]
    assert torch.equal(backward[0], forward[-1])  # 99 %: the same noise image, then denoised

    x_0 = Batches.to_model(next(Batches(images, 16, 8, seed=config.seed))[: vis.MAX_ROWS], "cpu")
    noises = []
    for t, x_t in zip(step_indices(20)[1:], forward[1:]):
        abar = d.alphas_cumprod[t]
        noises.append(((x_t - abar.sqrt() * x_0) / (1 - abar).sqrt()).flatten())
    for i in range(len(noises)):
        for j in range(i):
            corr = torch.corrcoef(torch.stack([noises[i], noises[j]]))[0, 1]
            assert abs(corr) < 0.1, (i, j, corr)  # 6,144 values each: independent draws give |corr| ~ 0.013
