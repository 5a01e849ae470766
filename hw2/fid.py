"""FID with clean-fid (Parmar et al. 2022, mode "clean"), as the homework defines it:
generated samples against the training images of the chosen class, resized to image_size.

The real side is featurized once per dataset, resolution and feature extractor and
cached in cache_dir, so a milestone only featurizes its generated images.

clean-fid's Inception network is a TorchScript file, inception-2015-12-05.pt. It is
looked for, in order, at --inception_path, $HW2_INCEPTION_PATH, cache_dir and clean-fid's
own download folder; if it is nowhere, it is downloaded into cache_dir. Both the lookup
and a test load happen before training starts, so a missing or broken file stops the
run at once instead of after an hour of training.
"""
import functools
import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid
from PIL import Image
from scipy import linalg

from hw2.data import IMAGE_SUFFIXES, files_key, resize_square
from hw2.download import download
from hw2.errors import UserError, shorten
from hw2.files import write_atomic

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "HW2_INCEPTION_PATH"
FEATURE_BATCH = 64


def locate_inception(path=None, cache_dir="./.cache"):
    """The path of the Inception weights, downloading them into cache_dir if they are nowhere."""
    explicit = path or os.environ.get(INCEPTION_ENV)
    if explicit:
        if not Path(explicit).is_file():
            source = "--inception_path" if path else f"${INCEPTION_ENV}"
            raise UserError(f"{source} points at {explicit}, which is not a file; it should be {INCEPTION_FILE}")
        return Path(explicit)
    # cache_dir first, then where clean-fid itself downloads it
    candidates = [Path(cache_dir) / INCEPTION_FILE, Path(tempfile.gettempdir()) / INCEPTION_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = (
        f"FID needs clean-fid's Inception weights, {INCEPTION_FILE} (about 92 MB). Download it from "
        f"{INCEPTION_URL} on a machine with network and pass --inception_path FILE "
        f"(or set {INCEPTION_ENV}, or put it at {candidates[0]}), or run without --fid"
    )
    return download(INCEPTION_URL, candidates[0], offline_hint=hint)


def load_inception(path, device):
    """clean-fid's "clean" feature extractor: (B, 3, 299, 299) floats in [0, 255] -> (B, 2048).

    A truncated or corrupt file fails here, with a message, rather than being reused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; clean-fid ships it
            base = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:
        raise UserError(
            f"{path} is not a loadable Inception network ({type(e).__name__}: {shorten(e, 120)}); "
            f"it is probably truncated: delete it and download {INCEPTION_FILE} again"
        ) from None
    layers = base.layers

    @torch.no_grad()
    def features(x):
        return layers.forward((x - 128) / 128).flatten(1)  # (B, 2048)

    return features


def _resize_real(side, img_np):
    """Bring a training image to the size the model generates, as the data pipeline does."""
    return np.asarray(resize_square(Image.fromarray(img_np), side))


def _stats(features):
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), clean-fid's formula,
    with the same eps on the diagonals when the product is singular."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real  # rounding leaves a tiny imaginary part
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features, mu2, sigma2):
    """The Frechet distance of features (n, d) to the Gaussian (mu2, sigma2), as
    frechet_distance(*_stats(features), mu2, sigma2), computed exactly without a d x d
    matrix square root when n <= d: with X the centred features and sigma1 = X^T X / (n - 1),
    the nonzero eigenvalues of sigma1 sigma2 are those of the n x n matrix X sigma2 X^T / (n - 1),
    so Tr (sigma1 sigma2)^(1/2) is the sum of their square roots. For 512 samples of
    Inception's 2048 features that is one 512 x 512 symmetric eigenproblem instead of a
    2048 x 2048 sqrtm, which takes seconds on a laptop CPU."""
    n, d = features.shape
    if n > d:
        return frechet_distance(*_stats(features), mu2, sigma2)
    x = features.astype(np.float64)
    mu1 = x.mean(axis=0)
    x -= mu1
    m = x @ sigma2 @ x.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (x * x).sum() / (n - 1) + np.trace(sigma2) - 2 * tr_covmean)


class FID:
    """FID of folders of generated images against one set of real images. prepare() computes
    (or reads from cache_dir) the real images' statistics; a call scores a folder."""

    def __init__(self, feature_fn, real_files, image_size, cache_dir, device, extractor_name="inception"):
        self.feature_fn = feature_fn
        self.device = device
        self.image_size = image_size
        self.real_files = [str(f) for f in real_files]
        key = files_key(real_files, f"{extractor_name} {image_size}")
        self.cache = Path(cache_dir) / f"fid-real-{image_size}px-{key}.npz"
        self.real_mu = self.real_sigma = None

    def features(self, files, transform=None, description=""):
        """clean-fid's own pipeline ("clean" mode: PIL bicubic to 299 px) over image files."""
        workers = min(8, os.cpu_count() or 1) if len(files) >= 1000 else 0
        with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed: training's draws stay as they were
            return cleanfid.get_files_features(
                files, self.feature_fn, num_workers=workers, batch_size=FEATURE_BATCH, device=self.device,
                mode="clean", custom_image_tranform=transform, description=description, verbose=bool(description),
            )

    def real_features(self, description=""):
        """Features of the training images, each first brought to the size the model generates."""
        return self.features(self.real_files, functools.partial(_resize_real, self.image_size), description)

    def prepare(self):
        if self.real_mu is not None:
            return self
        if self.cache.is_file():
            try:
                with np.load(self.cache) as stored:
                    self.real_mu, self.real_sigma = stored["mu"], stored["sigma"]
                return self
            except (OSError, ValueError, KeyError, EOFError):
                pass  # unreadable: computed again and rewritten below
        self.real_mu, self.real_sigma = _stats(self.real_features("FID: real images "))
        buffer = io.BytesIO()
        np.savez(buffer, mu=self.real_mu, sigma=self.real_sigma)
        try:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.cache, buffer.getvalue())
        except OSError as e:
            print(f"note: could not cache the FID statistics at {self.cache} ({e.strerror})")
        return self

    def __call__(self, folder):
        """FID of the PNG/JPEG files in folder against the real images."""
        files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(files) < 2:
            raise UserError(f"FID needs at least 2 generated images, {folder} has {len(files)}")
        self.prepare()
        return fid_from_features(self.features(files), self.real_mu, self.real_sigma)


def fid_device(device):
    """Inception runs on CUDA when training does, otherwise on the CPU (its TorchScript
    graph is not known to run on MPS)."""
    return device if torch.device(device).type == "cuda" else torch.device("cpu")


def build_fid(config, real_files, device):
    """FID's network, found and test-loaded: call it before anything is written, and
    prepare() the result once every input is checked."""
    device = fid_device(device)
    path = locate_inception(config.inception_path, config.cache_dir)
    return FID(load_inception(path, device), real_files, config.image_size, config.cache_dir, device)
