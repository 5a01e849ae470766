"""The files of one run in its --save_folder, by name, in one place.

For milestone m = step // save_and_sample_every:
    model-{m}.pt, model-latest.pt   checkpoints (hw2/checkpoint.py)
    sample_ddpm_{m}/00000.png ...   every image generated at milestone m (what FID reads)
    sample-{m}.png, sample-final.png  grids of the first num_samples of them
    metrics.csv, loss.png, fid.png  step, loss, FID, held-out loss, elapsed; their plots
    forward_diffusion.png, backward_diffusion.png   --visualize
    samples-step{S}-seed{N}/, samples-step{S}-seed{N}.png   --sample
    wandb/                          the W&B runs, unless $WANDB_DIR says elsewhere
A folder never mixes two runs: a fresh run into a folder that holds one is refused
unless --overwrite, which deletes that run's files (and only those) first.
"""
import re
import shutil
from pathlib import Path

from hw2.errors import UserError

LATEST = "model-latest.pt"
METRICS = "metrics.csv"

# What a run writes, as patterns of names directly in its folder.
RUN_FILES = (r"model-(\d+|latest)\.pt", r"sample_ddpm_\d+", r"sample-(\d+|final)\.png", r"metrics\.csv",
             r"loss\.png", r"fid\.png", r"(forward|backward)_diffusion\.png", r"samples-step\d+-seed-?\d+(\.png)?",
             r"wandb", r"wandb-run-id", r"\..*\.tmp\d+")


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)

    def checkpoint(self, m):
        return self.path / f"model-{m}.pt"

    @property
    def latest(self):
        return self.path / LATEST

    @property
    def metrics(self):
        return self.path / METRICS

    def samples(self, m):
        return self.path / f"sample_ddpm_{m}"

    def grid(self, m):
        return self.path / f"sample-{m}.png"

    def on_demand(self, step, seed):
        """(folder, grid) for --sample's images from the checkpoint of `step`, drawn with `seed`."""
        name = f"samples-step{step}-seed{seed}"
        return self.path / name, self.path / f"{name}.png"

    def numbered_checkpoints(self):
        """[(m, path)] of model-{m}.pt, oldest first."""
        found = []
        for p in self.path.glob("model-*.pt"):
            m = p.stem[len("model-"):]
            if m.isdigit():
                found.append((int(m), p))
        return sorted(found)

    def prune(self, keep):
        """Delete numbered checkpoints beyond the newest `keep` (0 keeps all)."""
        if keep:
            for _, old in self.numbered_checkpoints()[:-keep]:
                old.unlink(missing_ok=True)

    def run_files(self):
        """The files and folders of a run in this folder (nothing else the user keeps there)."""
        if not self.path.is_dir():
            return []
        pattern = re.compile("|".join(f"(?:{p})" for p in RUN_FILES))
        return sorted(p for p in self.path.iterdir() if pattern.fullmatch(p.name))

    def holds_run(self):
        """True when a run has left checkpoints or metrics here."""
        return self.latest.exists() or self.metrics.exists() or bool(self.numbered_checkpoints())

    def check_free(self):
        """Before a fresh run: refuse when another run lives here."""
        if self.holds_run():
            raise UserError(
                f"{self.path} already holds a run ({describe(self)}). To continue it: python main.py --load_path "
                f"{self.latest}. To start over and delete its files: add --overwrite. Or choose another --save_folder"
            )

    def clear(self):
        """--overwrite: delete the files of the run here (nothing else), so two runs never mix."""
        for p in self.run_files():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def describe(folder):
    """'checkpoints up to model-3.pt, metrics.csv', for messages."""
    parts = []
    numbered = folder.numbered_checkpoints()
    if numbered:
        parts.append(f"checkpoints up to {numbered[-1][1].name}")
    elif folder.latest.exists():
        parts.append(LATEST)
    if folder.metrics.exists():
        parts.append(METRICS)
    return ", ".join(parts)


def resolve_checkpoint(path):
    """--load_path: a checkpoint file, or a run folder meaning its model-latest.pt."""
    path = Path(path)
    if path.is_dir():
        if not (path / LATEST).is_file():
            raise UserError(f"--load_path {path} is a folder without {LATEST}: pass a checkpoint file or a run folder")
        return path / LATEST
    return path
