"""Writing sample images: one PNG per image, and grids. Inputs are (B, C, H, W) in [0, 1]."""
import math
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


def to_uint8(images):
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 numpy array."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _save_png(array, path):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_images(images, folder, start=0):
    """Save each image as folder/{index:05d}.png, numbering from `start`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images)):
        _save_png(array, folder / f"{start + i:05d}.png")


def grid(images, nrow=None):
    """Tile a batch into one (C, H', W') image, as close to square as the count allows."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    return make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, pad_value=1.0)


def save_grid(images, path, nrow=None):
    _save_png(to_uint8(grid(images, nrow)[None])[0], path)
