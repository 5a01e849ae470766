"""Shared fixtures: small image folders made on the fly, and a tiny configuration."""
import os
import sys
import warnings
from pathlib import Path

# One thread for the suite and every run it starts (main.py in a subprocess inherits it), set before
# torch loads: the tests' models are tiny, so a second thread buys little alone, and beside other
# work (a training run in another terminal) torch's spinning threads stall both (benchmarks/README.md).
# A thread count the user set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

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


class StandInLayers(nn.Module):
    """(B, 3, 299, 299) in [-1, 1] -> (B, 2048): a fixed random 5x5 conv, tanh, 16 x 16 average
    pooling. The tanh makes the features depend on the pixels' scale, the conv on the
    image's fine detail (its resolution before the resize to 299)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=3)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.3)
            self.conv.bias.copy_(torch.randn(8, generator=generator) * 0.1)

    def forward(self, x):
        return F.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 16).flatten(1)  # (B, 8 * 16 * 16)


class StandIn(nn.Module):
    """Shaped like clean-fid's TorchScript Inception (inception-2015-12-05.pt): clean-fid's own
    InceptionV3W loads it and calls its `layers` on (x - 128) / 128, as the project does."""

    def __init__(self):
        super().__init__()
        self.layers = StandInLayers()

    def forward(self, x):
        return self.layers(x)


def write_standin(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is what clean-fid ships: torch says
        warnings.simplefilter("ignore", FutureWarning)  # so with a FutureWarning (the newest)
        warnings.simplefilter("ignore", DeprecationWarning)  # or a DeprecationWarning (2.10 and older)
        torch.jit.script(StandIn()).save(str(path))
    return path


@pytest.fixture
def standin_file(tmp_path):
    return write_standin(tmp_path / "standin-inception.pt")


@pytest.fixture(autouse=True)
def nothing_written_into_the_clone():
    """A test writes only into its own temporary folders: none leaves a cache (or anything else
    git would not ignore anyway) in the project folder."""
    def cache_files():
        return set((ROOT / ".cache").glob("*")) if (ROOT / ".cache").is_dir() else set()

    before = cache_files()
    yield
    left = sorted(p.name for p in cache_files() - before)
    assert not left, f"the test left {', '.join(left)} in {ROOT / '.cache'}: give it a --cache_dir in tmp_path"
