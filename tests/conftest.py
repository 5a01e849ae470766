"""Shared fixtures: small image folders made on the fly, and a tiny configuration."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AFHQ_SAMPLE = ROOT.parent / "shared" / "afhq_sample"
HOMEWORK_UNET = ROOT.parent / "shared" / "homework_unet" / "golden.pt"


def golden_cases():
    """The starter U-Net's own weights, inputs and outputs (see shared/homework_unet/README.md)."""
    return torch.load(HOMEWORK_UNET, weights_only=True)["cases"]


needs_golden = pytest.mark.skipif(not HOMEWORK_UNET.is_file(),
                                  reason=f"{HOMEWORK_UNET} (the starter's own outputs) is absent")

# Tests never reach W&B's servers: wandb is off unless a test asks for offline mode.
os.environ["WANDB_MODE"] = "disabled"
os.environ.pop("WANDB_API_KEY", None)


def make_images(folder, count, size=48, seed=0, suffix=".jpg"):
    """Write `count` smooth random RGB images (gradients plus a blob) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        c = rng.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] * xx + c[k, 1] * yy + c[k, 2] * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1) for k in range(3)], -1)
        arr = (np.clip(img / max(img.max(), 1e-6), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}{suffix}")
    return folder


@pytest.fixture
def image_root(tmp_path):
    """data/{cat,dog,wild} with 12, 6 and 4 small images."""
    root = tmp_path / "data"
    for name, n, seed in (("cat", 12, 0), ("dog", 6, 1), ("wild", 4, 2)):
        make_images(root / name, n, seed=seed)
    return root


@pytest.fixture
def tiny_config(image_root, tmp_path):
    from hw2.config import Config

    return Config(
        data_path=str(image_root), data_class="cat", image_size=16, unet_dim=8, unet_dim_mults=(1, 2),
        time_steps=10, train_steps=4, batch_size=4, save_and_sample_every=2, num_samples=4,
        save_folder=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"), device="cpu",
    )


class PooledLayers(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 12)


class StandIn(nn.Module):
    """Shaped like clean-fid's TorchScript Inception: a `layers` submodule does the work."""

    def __init__(self):
        super().__init__()
        self.layers = PooledLayers()

    def forward(self, x):
        return self.layers(x)


@pytest.fixture
def standin_file(tmp_path):
    path = tmp_path / "standin-inception.pt"
    with pytest.warns(FutureWarning):  # TorchScript is deprecated, but it is what clean-fid ships
        torch.jit.script(StandIn()).save(str(path))
    return path
