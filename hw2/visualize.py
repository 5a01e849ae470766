"""The homework's Figures 3 and 4: the forward and the backward diffusion of the first
training batch at 0, 25, 50, 75 and 99 % of the T steps.

Forward: x_t ~ q(x_t | x_0) at each of those t. Backward: the reverse chain started from
the forward's last (99 %) noise image itself, in the model's [-1, 1] scale, recorded when
it passes the same t on its way down; its 0 % column is the final, denoised image.
Images are rows, steps are labelled columns.
"""
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion import unnormalize
from hw2 import fast
from hw2.data import Batches
from hw2.plots import pyplot, save_figure
from hw2.precision import autocast

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)
MAX_ROWS = 8


def step_indices(T):
    """0-based t at 0/25/50/75/99 % of T steps."""
    return [min(int(f * T), T - 1) for f in FRACTIONS]


@torch.no_grad()
def forward_images(diffusion, x_0, ts, generator):
    """[(B, C, H, W) in [-1, 1] for each t in ts]."""
    out = []
    for t in ts:
        noise = torch.randn(x_0.shape, device=x_0.device, generator=generator)
        out.append(diffusion.q_sample(x_0, torch.full((x_0.shape[0],), t, device=x_0.device), noise))
    return out


@torch.no_grad()
def backward_images(diffusion, x_start, ts, generator, progress=False):
    """Run p_sample from t = max(ts) down to 0; [(B, C, H, W) in [-1, 1] for each t in ts],
    where the entry for t is the chain's state x_t and the smallest t gets the final output.
    progress: show a bar over the chain's steps."""
    top = max(ts)
    keep = {t: None for t in ts}
    x = x_start
    keep[top] = x
    for i in tqdm(reversed(range(top + 1)), total=top + 1, desc="backward diffusion", unit="step", leave=False,
                  disable=not progress):
        x = diffusion.p_sample(x, torch.full((x.shape[0],), i, device=x.device), i, generator=generator)
        if i - 1 in keep:
            keep[i - 1] = x
    keep[min(ts)] = x
    return [keep[t] for t in ts]


def figure(columns, labels, title, path):
    """columns: list of (B, C, H, W) in [-1, 1] -> a rows x columns PNG at path."""
    rows = columns[0].shape[0]
    fig, axes = pyplot().subplots(rows, len(columns), figsize=(1.4 * len(columns), 1.4 * rows + 0.5), squeeze=False)
    for j, (images, label) in enumerate(zip(columns, labels)):
        images = unnormalize(images).cpu()
        axes[0, j].set_title(label, fontsize=8)
        for i in range(rows):
            axes[i, j].imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[i, j].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def visualize(diffusion, sampler, images, config, amp_dtype=None, logger=None):
    """Write forward_diffusion.png and backward_diffusion.png into config.save_folder (and log
    them). diffusion noises the first training batch of images ((N, 3, R, R) uint8); sampler,
    the same diffusion with the sampling weights (the EMA when there is one), denoises it."""
    device = diffusion.device
    diffusion.model.eval()
    sampler.model.eval()
    first = next(Batches(images, config.image_size, min(config.batch_size, images.shape[0]), seed=config.seed))
    x_0 = Batches.to_model(first[:MAX_ROWS], device)
    ts = step_indices(config.time_steps)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    forward = forward_images(diffusion, x_0, ts, generator)
    with fast.sampling(sampler.model), autocast(device, amp_dtype):
        backward = [x.float() for x in backward_images(sampler, forward[-1], ts, generator, progress=True)]

    folder = Path(config.save_folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [f"{round(f * 100)}% (t={t})" for f, t in zip(FRACTIONS, ts)]
    paths = {
        "forward_diffusion": figure(forward, labels, "Forward diffusion q(x_t | x_0)", folder / "forward_diffusion.png"),
        "backward_diffusion": figure(backward[::-1], labels[::-1], "Backward diffusion p(x_{t-1} | x_t)",
                                     folder / "backward_diffusion.png"),
    }
    for name, path in paths.items():
        print(f"saved {path}")
        if logger:
            logger.log_file(name, path)
    return paths
