"""Training images: found once, decoded and resized once, cropped and flipped every step.

The homework's pipeline is Resize(int(1.12 S)) -> RandomCrop(S) -> RandomHorizontalFlip
-> [-1, 1]. Decoding a 512 px JPEG costs far more than a training step at 32 px, so
the deterministic part (decode + resize) runs once per file and is cached in memory
and on disk; the random crop and flip still happen at every draw.
"""
import concurrent.futures
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusion import normalize
from hw2.errors import UserError
from hw2.files import torch_bytes, write_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESIZE_FACTOR = 1.12
CACHE_VERSION = 1


def resized_side(image_size):
    """The side images are resized to before the random crop (the homework's 1.12 S)."""
    return int(image_size * RESIZE_FACTOR)


def find_images(data_path, data_class):
    """Sorted image paths of one class folder, or of every subfolder for 'all'."""
    root = Path(data_path)
    if not root.is_dir():
        raise UserError(
            f"data folder {data_path} does not exist: download AFHQ with `python -m hw2.afhq` "
            f"or point --data_path at a folder of class subfolders"
        )
    folder = root if data_class == "all" else root / data_class
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise UserError(
            f"class folder {folder} does not exist (subfolders of {root}: {', '.join(found) or 'none'}); "
            f"choose another --data_class or use --data_class all"
        )
    files = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    if not files:
        raise UserError(f"no .jpg, .jpeg or .png images found in {folder}")
    return files


def decode(path, side):
    """Open one image file as an RGB uint8 array (side, side, 3), resized like torchvision's
    Resize(side) (shorter side to `side`, bilinear with antialiasing), then center-cropped
    to a square. Raises OSError or ValueError for files that cannot be used."""
    with Image.open(path) as img:
        w, h = img.size
        if w * h > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"{w}x{h} pixels is too large to be a training image")
        img.load()
        if img.mode.startswith("I"):  # 16- or 32-bit grayscale: keep the top 8 bits
            arr = np.asarray(img, dtype=np.float64)
            peak = 65535.0 if arr.max() > 255 else 255.0
            img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8))
        return np.asarray(resize_square(img.convert("RGB"), side), dtype=np.uint8)


def resize_square(img, side):
    """PIL image -> side x side: the shorter side to `side`, bilinear (what torchvision's
    Resize(side) does to a PIL image), then the central square (its CenterCrop(side))."""
    w, h = img.size
    if w <= h:
        size = (side, int(side * h / w))
    else:
        size = (int(side * w / h), side)
    img = img.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    return img.crop((left, top, left + side, top + side))


def files_key(files, tag):
    """A short hash of tag and each file's name, size and modification time: it changes
    whenever a file is added, removed or rewritten. Names caches built from the files."""
    h = hashlib.sha1(tag.encode())
    for f in map(Path, files):
        st = f.stat()
        h.update(f"\n{f.name}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def too_few_images(n, batch_size, world=1):
    per = f" ({world} processes x {batch_size})" if world > 1 else ""
    return UserError(f"the dataset has {n} usable images, fewer than one batch of {batch_size * world}{per}: "
                     f"add images or lower --batch_size")


def load_images(files, side, cache_dir=None, progress=True, need=1):
    """Decode and resize every file once: (uint8 tensor (N, 3, side, side), [skipped paths]).

    Results are cached in cache_dir under a key made of the side and each file's
    name, size and modification time, so any change to the files invalidates it.
    Fewer than `need` usable images is an error, raised before anything is cached, and
    whether or not the images come from the cache.
    """
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"images-{side}px-{files_key(files, f'v{CACHE_VERSION} side={side}')}.pt"
        if cache.is_file():
            try:
                stored = torch.load(cache, weights_only=True)
                images, skipped = stored["images"], [Path(p) for p in stored["skipped"]]
            except Exception:
                pass  # an unreadable cache is rebuilt below
            else:
                if images.shape[0] < need:
                    raise too_few_images(images.shape[0], need)
                return images, skipped

    arrays, skipped = [None] * len(files), []
    workers = min(32, os.cpu_count() or 1)
    bar = tqdm(total=len(files), desc="decoding images", unit="img", disable=not progress, leave=False)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool, bar:
        futures = {pool.submit(decode, f, side): i for i, f in enumerate(files)}
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                arrays[i] = fut.result()
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
                skipped.append(files[i])
            bar.update()
    kept = [a for a in arrays if a is not None]
    problem = None
    if not kept:
        problem = UserError(f"none of the {len(files)} image files could be read (first: {files[0]})")
    elif len(kept) < need:
        problem = too_few_images(len(kept), need)
    if problem:
        if progress:  # the closed bar leaves its line blank but unended: the error gets a line of its own
            print(file=sys.stderr)
        raise problem
    images = torch.from_numpy(np.stack(kept)).permute(0, 3, 1, 2).contiguous()  # (N, 3, side, side)
    skipped.sort()

    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, torch_bytes({"images": images, "skipped": [str(p) for p in skipped]}))
        except OSError as e:
            print(f"note: could not write the image cache {cache} ({e.strerror}); images will be decoded again next run")
    return images, skipped


class Batches:
    """An endless stream of training batches (B, 3, S, S) in [-1, 1].

    Each epoch visits the images in a new random order and drops the trailing
    partial batch; each draw crops every image at a random S x S window and flips
    half of them horizontally. All randomness comes from one generator whose
    state is part of state_dict(), so a resumed run sees the same batches.

    With several processes (rank, world), every process draws the same global batch of
    batch_size x world images and keeps its own slice of it.
    """

    def __init__(self, images, image_size, batch_size, seed, rank=0, world=1):
        n = images.shape[0]
        if n < batch_size * world:
            raise too_few_images(n, batch_size, world)
        self.images = images  # (N, 3, R, R) uint8
        self.image_size = image_size
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0
        self.epoch = 0

    def __iter__(self):
        return self

    def __next__(self):
        n, b, s = self.images.shape[0], self.batch_size * self.world, self.image_size
        if self.position + b > n:
            self.order = torch.randperm(n, generator=self.generator)
            self.position = 0
            self.epoch += 1
        index = self.order[self.position:self.position + b]
        self.position += b

        r = self.images.shape[-1]
        corners = torch.randint(0, r - s + 1, (b, 2), generator=self.generator).tolist()
        flips = (torch.rand(b, generator=self.generator) < 0.5).tolist()
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        index, corners, flips = index[mine].tolist(), corners[mine], flips[mine]
        batch = torch.empty((len(index), 3, s, s), dtype=torch.uint8)
        for k, (i, (y, x), flip) in enumerate(zip(index, corners, flips)):
            crop = self.images[i, :, y:y + s, x:x + s]
            batch[k] = crop.flip(-1) if flip else crop
        return batch

    @staticmethod
    def to_model(batch, device):
        """uint8 (B, 3, S, S) -> float32 in [-1, 1] on device."""
        return normalize(batch.to(device, non_blocking=True).float() / 255.0)

    def state_dict(self):
        return {"generator": self.generator.get_state(), "order": self.order,
                "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state):
        if state["order"].numel() != self.images.shape[0]:
            raise UserError(
                f"the checkpoint was trained on {state['order'].numel()} images, the data folder now has "
                f"{self.images.shape[0]}: resume on the same data"
            )
        self.generator.set_state(state["generator"])
        self.order = state["order"]
        self.position = state["position"]
        self.epoch = state["epoch"]


def split_heldout(images, count, seed):
    """(training images, held-out images): `count` images chosen by a seeded shuffle are kept
    out of training. Every process and every resumed run makes the same split."""
    if count == 0:
        return images, None
    if count >= images.shape[0]:
        raise UserError(f"--heldout_images {count} leaves no image to train on (the dataset has {images.shape[0]})")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[count:]], images[order[:count]]


def center_crops(images, image_size):
    """(N, 3, R, R) -> the central (N, 3, S, S): held-out images, without augmentation."""
    r = images.shape[-1]
    y = (r - image_size) // 2
    return images[:, :, y:y + image_size, y:y + image_size]


def training_data(config, progress=True, need=1, files=None):
    """Find (unless files are given), decode and cache the configured training images;
    report skipped files. Returns (files, images (N, 3, R, R) uint8)."""
    files = files or find_images(config.data_path, config.data_class)
    images, skipped = load_images(files, resized_side(config.image_size), config.cache_dir, progress, need)
    if skipped:
        names = ", ".join(p.name for p in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} unreadable image file(s) of {len(files)}: {names}")
    skipped = set(skipped)
    return [f for f in files if f not in skipped], images
