"""Where a run's numbers and pictures go: metrics.csv in the save folder, always, and
wandb (project DDPM_AFHQ), which never blocks or prompts: it runs online when a W&B
login is found, offline otherwise, and not at all with --wandb disabled. Its files go
where $WANDB_DIR says, or into the save folder. Every command on one run folder (training,
its resumes, --visualize, --sample) logs to one W&B run: its id is kept in the folder, and
each later command resumes it."""
import csv
import io
import netrc
import os
import re
import secrets
import shlex
from pathlib import Path

from hw2.files import append_lines, complete_lines, write_atomic
from hw2.images import grid, to_uint8

PROJECT = "DDPM_AFHQ"
METRICS_FILE = "metrics.csv"
RUN_ID_FILE = "wandb-run-id"  # in the save folder: the W&B run every command on this folder continues
COLUMNS = ("step", "loss", "fid", "heldout_loss", "elapsed_s")


def wandb_logged_in():
    """Whether W&B credentials exist, looked up where wandb itself looks, without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(choice):
    """auto -> online if logged in, else offline; an explicit WANDB_MODE wins over auto."""
    if choice != "auto":
        return choice
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def run_name(save_folder):
    """The save folder's name; './results/' gives 'results', '.' the current folder's name."""
    return Path(save_folder).resolve().name or "ddpm"


def read_metrics(save_folder):
    """The rows of metrics.csv as dicts of floats, the step an int (None where a value is blank).
    A last line cut short by a kill in the middle of an append is left out."""
    path = Path(save_folder) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for row in csv.DictReader(io.StringIO(complete_lines(path.read_text(encoding="utf-8")), newline="")):
        try:
            values = {k: (float(row[k]) if row.get(k) else None) for k in COLUMNS}
            values["step"] = int(values["step"])
            rows.append(values)
        except (ValueError, TypeError, KeyError):
            continue  # not a row this version wrote
    return rows


def csv_text(rows, header):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return text.getvalue()


class RunLog:
    def __init__(self, config, wandb_choice="auto"):
        self.folder = Path(config.save_folder)
        self.path = self.folder / METRICS_FILE
        self.rows = read_metrics(self.folder)
        whole = not self.path.is_file() or self.path.read_bytes().endswith(b"\n")
        self.on_disk = len(self.rows) if whole else None  # rows metrics.csv holds as they are; None: rewrite it
        self.run = None
        mode = wandb_mode(wandb_choice)
        if mode != "disabled":
            import wandb

            where = os.environ.get("WANDB_DIR") or str(self.folder)
            Path(where).mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")

            run_id = self.run_id()

            def start(mode):
                return wandb.init(
                    project=PROJECT, name=run_name(config.save_folder), config=config.to_dict(), id=run_id,
                    resume="allow", dir=where, mode=mode, settings=wandb.Settings(init_timeout=30),
                )

            try:
                self.run = start(mode)
            except Exception as e:  # no network or a rejected login: keep the run, log offline
                if mode != "online":
                    raise
                print(f"note: wandb could not go online ({type(e).__name__}); logging offline instead")
                self.run = start("offline")

    def run_id(self):
        """The id of this folder's W&B run: the one kept in the folder, or a new one, kept there."""
        path = self.folder / RUN_ID_FILE
        try:
            kept = path.read_text().strip()
        except OSError:
            kept = ""
        if kept.isalnum():
            return kept
        run_id = secrets.token_hex(6)  # W&B ids: lower-case letters and digits
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(path, run_id + "\n")
        return run_id

    def truncate(self, step):
        """Drop rows after `step`: they were written after the checkpoint a resumed run starts from."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self.flush(force=True)

    def log(self, values, step, elapsed):
        """values: a dict with some of loss, fid and heldout_loss. Each step's row reaches
        metrics.csv as it is logged (an append without fsync: about 10 us, measured), a
        milestone's figures when they are logged."""
        if self.rows and self.rows[-1]["step"] == step:
            self.rows[-1].update(values)  # FID joins the loss of its step
            if self.on_disk == len(self.rows):
                self.on_disk = None  # a row already written changed: the file is rewritten
        else:
            self.rows.append({**dict.fromkeys(COLUMNS), "step": step, "elapsed_s": round(elapsed, 3), **values})
        if self.run is not None:
            self.run.log(values, step=step)
        self.flush()

    def log_images(self, name, images, step):
        """images: (B, C, H, W) in [0, 1], logged to wandb as one grid."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(to_uint8(grid(images)[None])[0])}, step=step)

    def log_file(self, name, path):
        """A PNG already on disk (a figure) logged to wandb under name."""
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(str(path))})

    def log_summary(self, values):
        """Values that describe the run as a whole (not a step), e.g. --sample's FID."""
        if self.run is not None:
            self.run.summary.update(values)

    def sync_command(self):
        """(the command that uploads this run, how many parts it has) when it was logged offline,
        else None. Every command on the folder wrote a part of the same run; wandb sync uploads
        them in order, and one pattern names them all, however many commands there were."""
        if self.run is None or self.run.settings.mode != "offline":
            return None
        # wandb names each part offline-run-<time>-<id>, with -1, -2 ... when two start in one second
        part = re.compile(rf"offline-run-.*-{re.escape(self.run.id)}(-\d+)?")
        where = Path(self.run.settings.sync_dir).parent
        parts = sorted(p for p in where.iterdir() if part.fullmatch(p.name))
        if len(parts) == 1:
            return f"wandb sync {shlex.quote(str(parts[0]))}", 1
        return f"wandb sync {shlex.quote(str(where))}/offline-run-*-{self.run.id}*", len(parts)

    def flush(self, force=False):
        """Bring metrics.csv up to date: new rows appended (hw2.files.append_lines: a kill leaves at
        most a cut last line, which read_metrics leaves out); rewritten whole, atomically, where a
        written row changed, after a truncate, and with force."""
        if self.on_disk == len(self.rows) and not force:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.on_disk is None or force or not self.path.is_file():
            write_atomic(self.path, csv_text(self.rows, header=True))
        else:
            append_lines(self.path, csv_text(self.rows[self.on_disk:], header=False))
        self.on_disk = len(self.rows)

    def finish(self):
        """Write what is left and close the W&B run; when it was logged offline, say how to
        upload it (whatever ended the command: the end of training, Ctrl-C, an error)."""
        self.flush()
        if self.run is not None:
            sync = self.sync_command()
            self.run.finish()
            self.run = None
            if sync:
                command, parts = sync
                print(f"  W&B logged offline{f' ({parts} parts, one per command)' if parts > 1 else ''}; upload it "
                      f"with: {command}")
