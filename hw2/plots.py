"""loss.png and fid.png, drawn from metrics.csv so they survive restarts; and the one way
a figure is written. matplotlib is imported on first use (it costs half a second)."""
import io
from pathlib import Path

import numpy as np

from hw2.files import write_atomic
from hw2.runlog import read_metrics


def pyplot():
    """matplotlib.pyplot, drawing off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, **savefig):
    """Write a figure as a PNG, whole (never half a file), and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, **savefig)
    pyplot().close(fig)
    write_atomic(path, buffer.getvalue(), durable=False)
    return path


def plot_metrics(save_folder):
    """Write loss.png (raw and smoothed) and, once FID exists, fid.png; returns the paths written."""
    plt = pyplot()
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
        save_figure(fig, folder / "loss.png", bbox_inches="tight")
        written.append(folder / "loss.png")
    fids = [(r["step"], r["fid"]) for r in rows if r["fid"] is not None]
    if fids:
        steps, values = zip(*fids)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="o")
        ax.set(xlabel="step", ylabel="FID (clean-fid)", title="FID against the training images")
        ax.grid(alpha=0.3)
        save_figure(fig, folder / "fid.png", bbox_inches="tight")
        written.append(folder / "fid.png")
    return written
