"""loss.png and fid.png, drawn from metrics.csv so they survive restarts."""
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hw2.runlog import read_metrics  # noqa: E402


def _save(fig, path):
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_metrics(save_folder):
    """Write loss.png (raw and smoothed) and, once FID exists, fid.png; returns the paths written."""
    folder = Path(save_folder)
    rows = read_metrics(folder)
    written = []
    losses = [(r["step"], r["loss"]) for r in rows if r["loss"] is not None]
    if losses:
        steps, values = zip(*losses)
        window = max(1, len(values) // 50)
        sums = np.cumsum(np.concatenate(([0.0], values)))
        starts = np.maximum(np.arange(len(values)) + 1 - window, 0)
        smooth = (sums[1:] - sums[starts]) / (np.arange(len(values)) + 1 - starts)  # trailing mean
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, alpha=0.3, lw=0.8, label="loss")
        ax.plot(steps, smooth, lw=1.5, label=f"mean of {window} steps")
        heldout = [(r["step"], r["heldout_loss"]) for r in rows if r.get("heldout_loss") is not None]
        if heldout:
            ax.plot(*zip(*heldout), marker="o", lw=1, label="held-out images")
        ax.set(xlabel="step", ylabel="L1 noise-prediction loss", title="Training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        _save(fig, folder / "loss.png")
        written.append(folder / "loss.png")
    fids = [(r["step"], r["fid"]) for r in rows if r["fid"] is not None]
    if fids:
        steps, values = zip(*fids)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="o")
        ax.set(xlabel="step", ylabel="FID (clean-fid)", title="FID against the training images")
        ax.grid(alpha=0.3)
        _save(fig, folder / "fid.png")
        written.append(folder / "fid.png")
    return written
