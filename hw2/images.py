"""Writing sample images: one PNG per image, and grids. Inputs are (B, C, H, W) in [0, 1]."""
import io
import math
from pathlib import Path

import torch
from PIL import Image

from hw2.files import write_atomic

PADDING = 2  # pixels of white between the images of a grid


def to_uint8(images):
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 numpy array."""
    return images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(array):
    """(H, W, 3) uint8 -> the bytes of a PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def save_images(images, folder):
    """Save each image as folder/{index:05d}.png. Sample images are outputs no later run reads,
    so they are written whole (never half a file) but not fsynced one by one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images)):
        write_atomic(folder / f"{i:05d}.png", png_bytes(array), durable=False)


def grid(images):
    """Tile a batch into one (C, H', W') image, as close to square as the count allows, the
    images 2 px apart on white (the layout of torchvision's make_grid)."""
    images = images.detach().float().cpu()
    b, c, h, w = images.shape
    cols = min(b, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / cols)
    out = torch.ones(c, rows * (h + PADDING) + PADDING, cols * (w + PADDING) + PADDING)
    for k in range(b):
        y, x = divmod(k, cols)
        top, left = PADDING + y * (h + PADDING), PADDING + x * (w + PADDING)
        out[:, top:top + h, left:left + w] = images[k]
    return out


def save_grid(images, path):
    write_atomic(path, png_bytes(to_uint8(grid(images)[None])[0]), durable=False)
