"""The values a user sees or a later run reads, against expectations made without our code:
pixels on disk, the training signal (t, crops), the figures, metrics.csv across a resume, and
which real images FID compares with."""
import csv
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import main
from hw2.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from diffusion import Diffusion
from hw2.data import Batches, center_crops
from hw2.images import PADDING
from hw2.visualize import visualize
from test_cli import TINY
from trainer import Trainer

SIDE, T = 8, 10


def known_images(n=6, side=SIDE):
    """(n, 3, side, side) uint8 with every level 0..255 spread over them, and images unlike each other."""
    levels = torch.arange(n * 3 * side * side) * 37 % 256
    return levels.view(n, 3, side, side).to(torch.uint8)


class TrueNoise(nn.Module):
    """A stand-in network that knows x_0 and returns the exact noise in x_t:
    eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t). Every reverse step then sees the
    true x_0, and the chain must end on it. (One parameter, for the optimizer, kept at 1 by a
    learning rate too small to move it.)"""

    def __init__(self, x_0, alphas_cumprod):
        super().__init__()
        self.register_buffer("x_0", x_0)
        self.register_buffer("abar", alphas_cumprod)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, t):
        abar = self.abar[t].view(-1, 1, 1, 1)
        x_0 = self.x_0[: x.shape[0]] if x.shape[0] <= self.x_0.shape[0] else self.x_0[:1]
        return self.gain * (x - abar.sqrt() * x_0) / (1 - abar).sqrt()


def true_noise_diffusion(pixels, sampling_timesteps=None, timesteps=T):
    d = Diffusion(nn.Identity(), image_size=pixels.shape[-1], timesteps=timesteps,
                  sampling_timesteps=sampling_timesteps)
    x_0 = pixels.float() / 255 * 2 - 1  # [0, 255] -> [-1, 1], written out here, not by our normalize()
    d.model = TrueNoise(x_0, d.alphas_cumprod.clone())
    return d


def png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)  # (3, H, W) uint8


@pytest.mark.parametrize("sampling_timesteps", [None, 4], ids=["ddpm", "ddim"])
def test_a_model_that_knows_the_noise_recovers_the_image_in_every_png_and_in_what_fid_reads(tiny_config, tmp_path,
                                                                                         sampling_timesteps):
    """Through Trainer.milestone and fit: the sample PNGs, the milestone grid and the final grid
    (drawn anew after step 3) hold the known image pixel for pixel, and FID is handed the folder
    of those PNGs."""
    pixels = known_images()
    config = dataclasses.replace(tiny_config, image_size=SIDE, time_steps=T, train_steps=3, save_and_sample_every=2,
                                 num_samples=4, fid=True, fid_num_samples=6, learning_rate=1e-12,
                                 sampling_timesteps=sampling_timesteps)
    read_by_fid = []

    def fid(folder):
        read_by_fid.append(torch.stack([png(p) for p in sorted(folder.glob("*.png"))]))
        return 1.0

    trainer = Trainer(true_noise_diffusion(pixels, sampling_timesteps), config,
                      torch.randint(0, 255, (8, 3, SIDE + 2, SIDE + 2), dtype=torch.uint8), fid=fid)
    trainer.fit()
    folder = trainer.folder
    on_disk = torch.stack([png(folder.samples(1) / f"{i:05d}.png") for i in range(6)])
    assert torch.equal(on_disk, pixels)
    assert len(read_by_fid) == 1 and torch.equal(read_by_fid[0], pixels)
    for grid_path in (folder.grid(1), folder.path / "sample-final.png"):
        grid = png(grid_path)
        assert grid.shape == (3, 2 * SIDE + 3 * PADDING, 2 * SIDE + 3 * PADDING)  # 4 images, 2 x 2
        for k in range(4):
            y, x = divmod(k, 2)
            top, left = PADDING + y * (SIDE + PADDING), PADDING + x * (SIDE + PADDING)
            assert torch.equal(grid[:, top:top + SIDE, left:left + SIDE], pixels[k]), (grid_path.name, k)
        assert (grid[:, :PADDING] == 255).all()  # white between the images


def test_the_backward_figure_ends_on_the_image_and_the_forward_one_starts_there(tiny_config, tmp_path):
    """One solid colour per row: the backward figure's last column (the chain's output) shows it
    (to matplotlib's rounding), the forward figure's first column (t = 0, a little noise) nearly."""
    colours = torch.tensor([[200, 30, 90], [20, 160, 240]], dtype=torch.uint8)
    pixels = colours[:, :, None, None].expand(2, 3, SIDE, SIDE).contiguous()
    d = true_noise_diffusion(pixels, timesteps=50)
    config = dataclasses.replace(tiny_config, image_size=SIDE, time_steps=50, batch_size=2,
                                 save_folder=str(tmp_path / "figures"))
    paths = visualize(d, d, pixels, config)  # the first (and only) batch: the two solid images
    for name, exact in (("backward_diffusion", True), ("forward_diffusion", False)):
        image = png(paths[name]).permute(1, 2, 0).reshape(-1, 3).int()
        for colour in colours.int():
            near = ((image - colour).abs().max(dim=1).values <= (1 if exact else 12)).sum().item()
            assert near >= SIDE * SIDE, (name, colour.tolist(), near)  # at least one image's worth of pixels


def test_training_draws_every_t_from_0_to_T_minus_1_uniformly(tiny_config):
    """8,000 draws from a fixed seed: every step index appears, none outside, each about 1/T of
    the time (expected 800 per index, a standard deviation of about 27; the bound is 6 of them)."""
    torch.manual_seed(0)
    config = dataclasses.replace(tiny_config, image_size=SIDE, time_steps=T, batch_size=8)
    trainer = Trainer(true_noise_diffusion(known_images(8)), config, known_images(8, SIDE + 2))
    draws = [t for _ in range(1000) for t, _ in trainer.one_step.draw()][:1000]  # the training step's own draws
    t = torch.cat(draws)
    counts = torch.bincount(t, minlength=T)
    assert t.min() == 0 and t.max() == T - 1 and len(counts) == T
    assert ((counts - 800).abs() < 160).all(), counts.tolist()


def coordinates(side):
    """One (3, side, side) uint8 image whose channel 0 is the row and channel 1 the column."""
    rows = torch.arange(side).view(side, 1).expand(side, side)
    return torch.stack([rows, rows.t(), torch.zeros(side, side, dtype=torch.long)]).to(torch.uint8)


def test_random_crops_cover_every_position_and_the_heldout_crop_is_the_centre():
    """Over an epoch of draws, the top-left corners (read off the pixels themselves) take every
    row and column from 0 to R - S, vary from draw to draw, and flips mirror the columns."""
    r, s = 12, 8
    images = coordinates(r)[None].expand(64, 3, r, r).contiguous()
    batches = Batches(images, s, batch_size=16, seed=0)
    corners, flipped = [], 0
    for _ in range(20):
        for crop in next(batches):
            rows, cols = crop[0].long(), crop[1].long()
            assert (rows == rows[:, :1]).all() and torch.equal(rows[:, 0], rows[0, 0] + torch.arange(s))
            step = cols[0, 1] - cols[0, 0]
            assert abs(step) == 1 and torch.equal(cols[0], cols[0, 0] + step * torch.arange(s))
            flipped += step.item() < 0
            corners.append((rows[0, 0].item(), cols[0].min().item()))
    ys, xs = {y for y, _ in corners}, {x for _, x in corners}
    assert ys == xs == set(range(r - s + 1))
    assert len(set(corners)) > 15 and 100 < flipped < 220  # 320 crops: about half flipped
    centre = center_crops(coordinates(r)[None], s)[0]
    assert centre[0, 0, 0] == centre[1, 0, 0] == (r - s) // 2


def test_every_column_of_metrics_csv_continues_across_a_resume(image_root, tmp_path):
    """Step counts on, elapsed time keeps growing from where it stopped, and the losses are those
    of the same run without the stop (training resumes exactly on a CPU)."""
    base = [*TINY, "--data_path", str(image_root), "--cache_dir", str(tmp_path / "c"), "--save_and_sample_every", "2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main.main([*base, "--save_folder", str(whole), "--train_steps", "4"]) == 0
    assert main.main([*base, "--save_folder", str(split), "--train_steps", "2"]) == 0
    ckpt = load_checkpoint(split / "model-latest.pt")
    stored = ckpt["elapsed"] = 1000.0  # training seconds up to step 2, as if the run had been long
    save_checkpoint(checkpoint_bytes(ckpt), split / "model-latest.pt")
    assert main.main([*base, "--save_folder", str(split), "--train_steps", "4", "--load_path", str(split)]) == 0

    def rows(folder):
        with open(folder / "metrics.csv") as f:
            return list(csv.DictReader(f))

    ours, reference = rows(split), rows(whole)
    assert [r["step"] for r in ours] == ["1", "2", "3", "4"]
    elapsed = [float(r["elapsed_s"]) for r in ours]
    assert all(a < b for a, b in zip(elapsed, elapsed[1:])), elapsed
    # the resumed steps count from the stored time, not from a new clock, nor with the pause in it
    assert stored < elapsed[2] < elapsed[3] < stored + 60, (stored, elapsed)
    assert [float(r["loss"]) for r in ours] == pytest.approx([float(r["loss"]) for r in reference], abs=1e-6)


def test_fid_compares_with_the_statistics_of_the_images_it_was_given(image_root, tmp_path):
    """Two FIDs over one cache folder, one on the cats and one on the dogs: the dogs' statistics
    are computed from the dogs, not taken from the cats' cache entry."""
    from hw2.data import find_images
    from hw2.fid import FID

    def pooled(x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)

    seen = []

    def recording(x):
        seen.append(x.shape[0])
        return pooled(x)

    cats = FID(recording, find_images(image_root, "cat"), 16, tmp_path / "cache", "cpu", extractor_name="p").prepare()
    dogs = FID(recording, find_images(image_root, "dog"), 16, tmp_path / "cache", "cpu", extractor_name="p").prepare()
    assert sum(seen) == 12 + 6
    assert not np.allclose(cats.real_mu, dogs.real_mu)


def test_metrics_csv_holds_the_error_the_model_makes(tiny_config):
    """A network whose noise prediction is off by a known factor: every image is one picture
    that crops and flips leave as it is (its full size, mirror-symmetric), and TrueNoise scaled
    by 1.5 predicts 1.5 eps, so the L1 loss is 0.5 E|eps| = 0.5 sqrt(2 / pi) = 0.399 at every
    step (1,536 noise values a step: within 0.04 by 5 standard deviations), the held-out loss
    the same, and the fid column what FID returned."""
    from hw2.runlog import RunLog

    half = known_images(1, SIDE)[0, :, :, : SIDE // 2]
    picture = torch.cat([half, half.flip(-1)], dim=-1)  # (3, SIDE, SIDE), mirror-symmetric
    pixels = picture[None].expand(8, 3, SIDE, SIDE).contiguous()
    d = true_noise_diffusion(pixels)
    with torch.no_grad():
        d.model.gain.fill_(1.5)
    config = dataclasses.replace(tiny_config, image_size=SIDE, time_steps=T, train_steps=3, save_and_sample_every=2,
                                 fid=True, fid_num_samples=6, learning_rate=1e-12)
    logger = RunLog(config, "disabled")
    trainer = Trainer(d, config, pixels, logger=logger, fid=lambda folder: 12.5, heldout=pixels[:5])
    trainer.fit()
    logger.finish()
    with open(trainer.folder.metrics) as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    expected = 0.5 * (2 / np.pi) ** 0.5
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert abs(float(row["loss"]) - expected) < 0.04, (step, row)
    assert abs(float(rows[2]["heldout_loss"]) - expected) < 0.04 and float(rows[2]["fid"]) == 12.5
    assert rows[1]["fid"] == rows[3]["fid"] == ""  # FID at milestones only
