"""The training loop: a small class of verbs (train_step, sample, milestone, save, load,
fit). The files it writes are named in hw2/runfolder.py."""
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion import Diffusion
from hw2 import fast
from hw2.checkpoint import capture_rng, checkpoint_bytes, is_homework_checkpoint, load_optimizer_state, \
    load_unet_weights, restore_rng, save_checkpoint
from hw2.data import Batches
from hw2.distributed import Processes
from hw2.ema import EMA
from hw2.errors import Interrupted, UserError
from hw2.heldout import heldout_loss
from hw2.images import save_grid, save_images
from hw2.interrupt import StopRequests
from hw2.plots import plot_metrics
from hw2.runfolder import RunFolder
from hw2.sampling import generate
from hw2.step import TrainStep


class Trainer:
    def __init__(self, diffusion, config, images, *, logger=None, fid=None, amp_dtype=None, processes=None,
                 heldout=None):
        """diffusion: a Diffusion already on its device; config: a Config;
        images: decoded training images (N, 3, R, R) uint8 (hw2.data.training_data);
        logger: a hw2.runlog.RunLog or None; fid: a hw2.fid.FID or None;
        amp_dtype: the autocast dtype (hw2.precision.amp_dtype), None for float32;
        processes: this process's place among torchrun's (hw2.distributed), None when alone;
        heldout: images kept out of training (N, 3, R, R) uint8, for heldout_loss(), or None."""
        self.diffusion = diffusion
        self.model = diffusion.model
        self.config = config
        self.device = diffusion.device
        self.logger = logger
        self.fid = fid
        self.folder = RunFolder(config.save_folder)
        self.procs = processes or Processes()
        self.heldout = heldout
        self.batches = Batches(images, config.image_size, config.batch_size, seed=config.seed,
                               rank=self.procs.rank, world=self.procs.world)
        self.train_module = diffusion  # what the loss is computed through: DDP's wrapper when distributed
        if self.procs.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(diffusion, device_ids=ids, broadcast_buffers=False)
        self.amp_dtype = amp_dtype
        capturable, _ = fast.step_plan(self.device, amp_dtype, self.procs, config)
        self.opt = fast.make_adam(self.model, config.learning_rate, capturable=capturable)
        self.ema = EMA(self.model, config.ema_decay) if config.ema_decay else None
        self.sampler = diffusion.with_model(self.ema.model) if self.ema else diffusion  # what samples are drawn with
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.one_step = fast.step_for_trainer(
            TrainStep(diffusion, self.opt, batch_size=config.batch_size, passes=config.gradient_accumulate_every,
                      amp_dtype=amp_dtype, scaler=self.scaler, processes=self.procs, train_module=self.train_module),
            config)
        self.step = 0
        self.saved_step = None  # the step of model-latest.pt as this process last wrote or read it
        self.last_loss = None
        self.last_fid = None
        self.milestone_images = None  # (step, images) of the newest milestone, reused by the final grid
        self.elapsed_before = 0.0  # training seconds spent before this process started
        self.resumed = False  # from a checkpoint of this project's (not the homework's weights-only format)
        self.started = time.monotonic()

    @property
    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.started

    # one optimizer step

    def train_step(self):
        """One optimizer step (hw2/step.py) and the host work around it: the next batches into
        its buffers, the loss read and checked, EMA. Returns the mean loss."""
        self.model.train()
        self.one_step.load(next(self.batches) for _ in range(self.config.gradient_accumulate_every))
        loss = self.procs.mean(self.one_step()).item()
        if not math.isfinite(loss):
            raise UserError(
                f"the loss became {loss} at step {self.step + 1}; training stopped and no checkpoint was "
                f"overwritten. Resume from the last one with a lower --learning_rate"
            )
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        self.last_loss = loss
        return loss

    # sampling and evaluation

    def sample(self, n, seed):
        """n images (n, C, H, W) in [0, 1] from the sampling weights (every process takes part)."""
        return generate(self.sampler, n, seed, self.amp_dtype, self.procs, progress=True)

    def milestone(self):
        """Save a checkpoint, then make the milestone's outputs."""
        m = self.step // self.config.save_and_sample_every
        if self.logger:
            self.logger.flush()
        self.save(self.folder.checkpoint(m))
        self.milestone_outputs(m)

    def complete_milestone(self):
        """A run resumed from a milestone's checkpoint whose outputs a stop interrupted makes them
        first: the same seed, so the same images an uninterrupted run made."""
        if not self.resumed:
            return
        rows = self.logger.rows if self.logger else []
        missing = missing_outputs(self.folder, self.config, self.step, rows) if self.procs.main else []
        if not self.procs.any(bool(missing)):  # a collective: every process draws its share
            return
        m = self.step // self.config.save_and_sample_every
        if self.procs.main:
            tqdm.write(f"step {self.step}: milestone {m} was interrupted before {', '.join(missing)} "
                       f"{'was' if len(missing) == 1 else 'were'} made: making {'it' if len(missing) == 1 else 'them'} now")
        self.milestone_outputs(m)

    def milestone_outputs(self, m):
        """Draw and save milestone m's samples and grid, then the held-out loss, FID and plots."""
        n = samples_drawn(self.config)
        images = self.sample(n, seed=self.config.seed + m)
        self.milestone_images = (self.step, images)
        if not self.procs.main:
            return
        save_images(images, self.folder.samples(m))
        save_grid(images[: self.config.num_samples], self.folder.grid(m))
        if self.logger:
            self.logger.log_images("samples", images[: self.config.num_samples], self.step)
        values = {}
        if self.heldout is not None:
            cfg = self.config
            values["heldout_loss"] = heldout_loss(self.sampler, self.heldout, cfg.image_size, cfg.batch_size, cfg.seed,
                                                  self.amp_dtype)
        if self.fid:
            values["fid"] = self.last_fid = self.fid(self.folder.samples(m))
        figures = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items())
        tqdm.write(f"step {self.step}: saved {self.folder.checkpoint(m).name} and the grid {self.folder.grid(m).name}"
                   + (f"; {figures}" if figures else ""))
        if values and self.logger:
            self.logger.log(values, self.step, self.elapsed)
        plot_metrics(self.folder.path)

    # checkpoints

    def state_dict(self):
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema else {}),
            "data": self.batches.state_dict(),
            "rng": capture_rng(self.device, self.procs),
            "elapsed": self.elapsed,
            "config": self.config.to_dict(),
        }

    def save(self, path):
        """Write the checkpoint to path and to model-latest.pt, each atomically; then drop
        numbered checkpoints beyond --keep_checkpoints. A failed write (a full disk, a folder
        that cannot be written) leaves the previous checkpoints as they were. Every process
        calls it (each gives its random states); the main process writes."""
        state = self.state_dict()
        if not self.procs.main:
            self.saved_step = self.step
            return
        latest = self.folder.latest
        try:
            self.folder.path.mkdir(parents=True, exist_ok=True)
            save_checkpoint(checkpoint_bytes(state), *dict.fromkeys([path, latest]))
        except OSError as e:
            raise UserError(
                f"could not write the checkpoint {path} ({e.strerror or e}); the previous checkpoint {latest} is "
                f"intact. Free some space or choose another --save_folder, then resume with --load_path"
            ) from None
        self.saved_step = self.step
        self.folder.prune(self.config.keep_checkpoints)

    def load(self, ckpt, path):
        """Resume from a checkpoint (a dict from hw2.checkpoint.load_checkpoint, read from path):
        weights, optimizer, step, data order and RNG states. The homework's own checkpoints
        hold weights (and a step) only; they restore those."""
        load_unet_weights(self.model, ckpt, path)
        self.step = int(ckpt.get("step", 0))
        if Path(path).resolve() == self.folder.latest.resolve():
            self.saved_step = self.step
        if is_homework_checkpoint(ckpt):
            if self.procs.main:
                print(f"note: {path} holds weights only (the homework's format): training continues from step "
                      f"{self.step} with a fresh optimizer and data order")
            if self.ema:
                self.ema.load_state_dict(self.model.state_dict())
            return
        self.resumed = True
        self.elapsed_before = float(ckpt.get("elapsed", 0.0))
        self.started = time.monotonic()
        load_optimizer_state(self.opt, ckpt["optimizer"])  # its values; this run's settings (lr, capturable, fused)
        if self.ema:  # a checkpoint without an average starts it from the loaded weights
            self.ema.load_state_dict(ckpt.get("ema") or self.model.state_dict())
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.batches.load_state_dict(ckpt["data"])
        note = restore_rng(ckpt.get("rng", {}), self.device, self.procs)
        if note and self.procs.main:
            print(note)

    # the loop

    def fit(self):
        """Train until train_steps, with a milestone every save_and_sample_every steps, then
        draw the final grid. A signal stops it at the next safe point, after a checkpoint."""
        cfg = self.config
        if self.logger:
            self.logger.truncate(self.step)  # rows past the checkpoint belong to a lost run
        try:
            with StopRequests(announce=self.procs.main) as stop:
                self._loop(stop)
        except KeyboardInterrupt:  # a second Ctrl-C
            raise Interrupted(f"interrupted at step {self.step}; {self.on_disk()}", 128 + signal.SIGINT) from None
        except fast.CaptureBroke as e:  # the training step's capture, or a milestone's sampling
            resume = (self.on_disk() if self.saved_step is not None
                      else "nothing was saved: run the same command again with")
            raise UserError(f"{e}; the run stopped. {resume} --cuda_graph False") from None
        if self.procs.any(stop.signal is not None):  # a collective: every process must ask
            signum = stop.signal or signal.SIGTERM  # another process was signalled
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.step}; {self.on_disk()}",
                              128 + signum)
        if self.milestone_images and self.milestone_images[0] == self.step:
            final = self.milestone_images[1][: cfg.num_samples]  # the last step was a milestone
        else:
            try:
                final = self.sample(cfg.num_samples, seed=cfg.seed - 1)
            except fast.CaptureBroke as e:
                raise UserError(f"{e}; training is complete ({self.folder.latest} holds step {self.saved_step}) but "
                                f"the final grid was not drawn. Draw images with: python main.py --load_path "
                                f"{self.folder.path} --sample {cfg.num_samples} --cuda_graph False") from None
        if self.procs.main:
            save_grid(final, self.folder.path / "sample-final.png")

    def _loop(self, stop):
        cfg = self.config
        stop.phase = "milestone"
        self.complete_milestone()
        stop.phase = "step"
        with tqdm(initial=self.step, total=cfg.train_steps, desc="steps", dynamic_ncols=True,
                  disable=not self.procs.main) as bar:
            while self.step < cfg.train_steps and not self.procs.any(stop.signal is not None):
                loss = self.train_step()
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # drawn when the bar next redraws
                bar.update(1)
                if self.logger:
                    self.logger.log({"loss": loss}, self.step, self.elapsed)
                if self.step % cfg.save_and_sample_every == 0:
                    stop.phase = "milestone"
                    self.milestone()
                    stop.phase = "step"
        if self.step != self.saved_step:  # the last milestone did not save this step
            if self.logger:
                self.logger.flush()
            self.save(self.folder.latest)
            if self.procs.main:
                plot_metrics(self.folder.path)

    def on_disk(self):
        """What a stopped run leaves to resume from, and how."""
        if self.saved_step is None:
            return "no checkpoint was saved, so there is nothing to resume"
        return (f"{self.folder.latest} holds step {self.saved_step}. Resume with: "
                f"python main.py --load_path {self.folder.path}")


def samples_drawn(config):
    """How many images a milestone draws: the grid's, or FID's where more."""
    return max(config.num_samples, config.fid_num_samples if config.fid else 0)


def missing_outputs(folder, config, step, rows):
    """What of the milestone at `step` (a hw2.runfolder.RunFolder's, its metrics.csv rows given)
    is not there: [] when all is, or when `step` is no milestone's."""
    every = config.save_and_sample_every
    if step == 0 or step % every:
        return []
    m = step // every
    missing = []
    if len(list(folder.samples(m).glob("*.png"))) < samples_drawn(config):
        missing.append(f"{folder.samples(m).name}/")
    if not folder.grid(m).is_file():
        missing.append(folder.grid(m).name)
    row = next((r for r in rows if r["step"] == step), {})
    if config.fid and row.get("fid") is None:
        missing.append("its FID")
    if config.heldout_images and row.get("heldout_loss") is None:
        missing.append("its held-out loss")
    return missing

