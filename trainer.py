"""The training loop: a small class of verbs (train_step, sample, evaluate, milestone, save, load, fit).

Files in save_folder, for milestone m = step // save_and_sample_every:
    model-{m}.pt, model-latest.pt   checkpoints (see hw2/checkpoint.py)
    sample_ddpm_{m}/00000.png ...   one PNG per generated image (what FID reads)
    sample-{m}.png                  a grid of the first num_samples of them
    sample-final.png                a grid drawn after the last step
    metrics.csv, loss.png, fid.png  step, loss, FID and elapsed time, and their plots
"""
import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion import Diffusion
from hw2.checkpoint import (capture_rng, checkpoint_bytes, is_homework_checkpoint, load_checkpoint, load_unet_weights,
                            restore_rng, save_checkpoint)
from hw2.config import MODEL_FIELDS, Config
from hw2.data import Batches, center_crops
from hw2.distributed import Processes
from hw2.ema import EMA
from hw2.errors import Interrupted, UserError
from hw2.images import save_grid, save_images
from hw2.interrupt import StopRequests
from hw2.plots import plot_metrics
from hw2.precision import autocast

SAMPLE_CHUNK = 256  # images generated per forward pass when sampling


def make_adam(params, lr):
    """Adam, with the fused kernel where this torch has it for these tensors: one kernel for
    all parameters instead of several per parameter. Same update; benchmarks/ measures it."""
    params = list(params)
    if params[0].device.type in ("cpu", "cuda"):  # fused MPS kernels are newer; not relied on
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr)


class Trainer:
    def __init__(self, diffusion, config, images, logger=None, fid=None, amp_dtype=None, processes=Processes(),
                 heldout=None):
        """diffusion: a Diffusion already on its device; config: a Config;
        images: decoded training images (N, 3, R, R) uint8 (hw2.data.training_data);
        logger: a hw2.runlog.RunLog or None; fid: a hw2.fid.FID or None;
        amp_dtype: the autocast dtype (hw2.precision.amp_dtype), None for float32;
        processes: this process's place among torchrun's (hw2.distributed);
        heldout: images kept out of training (N, 3, R, R) uint8, for heldout_loss(), or None."""
        self.diffusion = diffusion
        self.model = diffusion.model
        self.config = config
        self.device = diffusion.device
        self.logger = logger
        self.fid = fid
        self.save_folder = Path(config.save_folder)
        self.procs = processes
        self.heldout = heldout
        self.batches = Batches(images, config.image_size, config.batch_size, seed=config.seed,
                               rank=processes.rank, world=processes.world)
        self.train_module = diffusion  # what the loss is computed through: DDP's wrapper when distributed
        if processes.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(diffusion, device_ids=ids, broadcast_buffers=False)
        self.opt = make_adam(self.model.parameters(), config.learning_rate)
        self.amp_dtype = amp_dtype
        self.ema = None
        self.sampler = diffusion  # what samples are drawn with: the EMA weights when on
        if config.ema_decay:
            self.ema = EMA(self.model, config.ema_decay)
            self.sampler = Diffusion(self.ema.model, image_size=diffusion.image_size, channels=diffusion.channels,
                                     timesteps=diffusion.num_timesteps,
                                     sampling_timesteps=diffusion.sampling_timesteps).to(self.device)
        # float16 gradients underflow without loss scaling; bfloat16 and float32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.step = 0
        self.elapsed_before = 0.0  # training seconds spent before this process started
        self.started = time.monotonic()

    @property
    def elapsed(self):
        return self.elapsed_before + time.monotonic() - self.started

    # one optimizer step

    def draw_t_and_noise(self, x_0):
        """t (B,) and eps (B, C, H, W) for this process's images: every process draws them for
        the whole global batch and keeps its slice, as the data pipeline does."""
        b, world = x_0.shape[0], self.procs.world
        t = torch.randint(0, self.diffusion.num_timesteps, (b * world,), device=self.device)
        noise = torch.randn((b * world, *x_0.shape[1:]), device=self.device)
        mine = slice(self.procs.rank * b, (self.procs.rank + 1) * b)
        return t[mine], noise[mine]

    def train_step(self):
        """gradient_accumulate_every forward/backward passes, one Adam step; returns the mean loss."""
        self.model.train()
        accumulate = self.config.gradient_accumulate_every
        total = torch.zeros((), device=self.device)
        for k in range(accumulate):
            x_0 = Batches.to_model(next(self.batches), self.device)
            t, noise = self.draw_t_and_noise(x_0)
            last = k == accumulate - 1
            # processes exchange gradients once per step, on its last pass
            sync = contextlib.nullcontext() if last or not self.procs.distributed else self.train_module.no_sync()
            with sync:
                with autocast(self.device, self.amp_dtype):
                    loss = self.train_module(x_0, noise=noise, t=t) / accumulate
                self.scaler.scale(loss).backward()
            total += loss.detach()
        loss = self.procs.mean(total).item()
        if not math.isfinite(loss):
            raise UserError(
                f"the loss became {loss} at step {self.step + 1}; training stopped and no checkpoint was "
                f"overwritten. Resume from the last one with a lower --learning_rate"
            )
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        self.step += 1
        return loss

    # sampling and evaluation

    @torch.inference_mode()
    def sample(self, n, seed):
        """n images (n, C, H, W) in [0, 1], from a generator of their own so that sampling
        never disturbs the training randomness (and a resumed run stays exact)."""
        self.model.eval()
        share = math.ceil(n / self.procs.world)  # each process draws a share; all get them all
        generator = torch.Generator(device=self.device).manual_seed(seed + 7919 * self.procs.rank)
        with autocast(self.device, self.amp_dtype):
            chunks = [
                self.sampler.sample(min(SAMPLE_CHUNK, share - start), generator=generator).float()
                for start in range(0, share, SAMPLE_CHUNK)
            ]
        return self.procs.gather(torch.cat(chunks))[:n].cpu()

    def evaluate(self, folder):
        """FID of the images in folder: printed, logged to metrics.csv and wandb, plotted."""
        score = self.fid(folder)
        tqdm.write(f"step {self.step}: FID {score:.3f}")
        if self.logger:
            self.logger.log({"fid": score}, self.step, self.elapsed)
        return score

    @torch.inference_mode()
    def heldout_loss(self):
        """Mean L1 noise-prediction error of the sampling weights on the held-out images, over
        t uniform; t and the noise come from a fixed seed, so milestones are comparable."""
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        images = center_crops(self.heldout, self.config.image_size)
        total = 0.0
        for start in range(0, images.shape[0], self.config.batch_size):
            x_0 = Batches.to_model(images[start:start + self.config.batch_size], self.device)
            t = torch.randint(0, self.sampler.num_timesteps, (x_0.shape[0],), device=self.device, generator=generator)
            noise = torch.randn(x_0.shape, device=self.device, generator=generator)
            with autocast(self.device, self.amp_dtype):
                total += self.sampler.p_loss(x_0, t, noise).item() * x_0.shape[0]
        return total / images.shape[0]

    def milestone(self):
        """Save a checkpoint, then draw and save samples, then FID and plots."""
        m = self.step // self.config.save_and_sample_every
        if self.logger:
            self.logger.flush()
        self.save(self.save_folder / f"model-{m}.pt")
        n = max(self.config.num_samples, self.config.fid_num_samples if self.config.fid else 0)
        images = self.sample(n, seed=self.config.seed + m)  # every process takes part
        if not self.procs.main:
            return
        folder = self.save_folder / f"sample_ddpm_{m}"
        save_images(images, folder)
        save_grid(images[: self.config.num_samples], self.save_folder / f"sample-{m}.png")
        if self.logger:
            self.logger.log_images("samples", images[: self.config.num_samples], self.step)
        if self.heldout is not None:
            value = self.heldout_loss()
            tqdm.write(f"step {self.step}: held-out loss {value:.4f}")
            if self.logger:
                self.logger.log({"heldout_loss": value}, self.step, self.elapsed)
        if self.fid:
            self.evaluate(folder)
        plot_metrics(self.save_folder)

    # checkpoints

    def state_dict(self):
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema else {}),
            "data": self.batches.state_dict(),
            "rng": capture_rng(),
            "elapsed": self.elapsed,
            "config": self.config.to_dict(),
        }

    def save(self, path):
        """Write the checkpoint to path and to model-latest.pt, each atomically; then drop
        numbered checkpoints beyond --keep_checkpoints. A failed write (a full disk, a folder
        that cannot be written) leaves the previous checkpoints as they were."""
        if not self.procs.main:
            return
        latest = self.save_folder / "model-latest.pt"
        try:
            self.save_folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(checkpoint_bytes(self.state_dict()), *dict.fromkeys([Path(path), latest]))
        except OSError as e:
            raise UserError(
                f"could not write the checkpoint {path} ({e.strerror or e}); the previous checkpoint {latest} is "
                f"intact. Free some space or choose another --save_folder, then resume with --load_path"
            ) from None
        if self.config.keep_checkpoints:
            numbered = sorted((int(p.stem[len("model-"):]), p) for p in self.save_folder.glob("model-*.pt")
                              if p.stem[len("model-"):].isdigit())
            for _, old in numbered[: -self.config.keep_checkpoints]:
                old.unlink()

    def load(self, path):
        """Resume from a checkpoint: weights, optimizer, step, data order and RNG states.
        The homework's own checkpoints hold weights (and a step) only; they restore those."""
        ckpt = load_checkpoint(path)
        if "config" in ckpt:
            theirs = Config.from_dict(ckpt["config"])
            diff = self.config.differences(theirs, MODEL_FIELDS)
            if diff:
                listed = ", ".join(f"--{n} {ours} here but {other} in the checkpoint" for n, ours, other in diff)
                raise UserError(f"{path} was trained with a different model: {listed}")
        ignored = load_unet_weights(self.model, ckpt, path)
        if ignored and self.procs.main:
            print(f"note: ignored {len(ignored)} tensor(s) of the checkpoint's Diffusion that are not U-Net weights "
                  f"({', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}); the schedule comes from --time_steps")
        self.step = int(ckpt.get("step", 0))
        if is_homework_checkpoint(ckpt):
            if self.procs.main:
                print(f"note: {path} holds weights only (the homework's format): training continues from step "
                      f"{self.step} with a fresh optimizer and data order")
            if self.ema:
                self.ema.load_state_dict(self.model.state_dict())
            return
        self.elapsed_before = float(ckpt.get("elapsed", 0.0))
        self.started = time.monotonic()
        self.opt.load_state_dict(ckpt["optimizer"])
        if self.ema:  # a checkpoint without an average starts it from the loaded weights
            self.ema.load_state_dict(ckpt.get("ema") or self.model.state_dict())
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        self.batches.load_state_dict(ckpt["data"])
        restore_rng(ckpt.get("rng", {}))

    # the loop

    def fit(self):
        """Train until train_steps, with a milestone every save_and_sample_every steps."""
        cfg = self.config
        if self.logger:
            self.logger.truncate(self.step)  # rows past the checkpoint belong to a lost run
        with StopRequests() as stop, tqdm(initial=self.step, total=cfg.train_steps, desc="steps",
                                          dynamic_ncols=True, disable=not self.procs.main) as bar:
            while self.step < cfg.train_steps and not self.procs.any(stop.signal is not None):
                loss = self.train_step()
                bar.set_postfix(loss=f"{loss:.4f}")
                bar.update(1)
                if self.logger:
                    self.logger.log({"loss": loss}, self.step, self.elapsed)
                if self.step % cfg.save_and_sample_every == 0:
                    self.milestone()
        if self.step % cfg.save_and_sample_every:  # the last milestone did not save this step
            if self.logger:
                self.logger.flush()
            self.save(self.save_folder / "model-latest.pt")
            if self.procs.main:
                plot_metrics(self.save_folder)
        if self.procs.any(stop.signal is not None):  # a collective: every process must ask
            latest = self.save_folder / "model-latest.pt"
            saved = (f"the checkpoint {latest} is saved. Resume with the same flags plus --load_path {latest}"
                     if self.step else "no step was taken, so there is nothing to save")
            signum = stop.signal or signal.SIGTERM  # another process was signalled
            raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.step}; {saved}", 128 + signum)
        final = self.sample(cfg.num_samples, seed=cfg.seed - 1)
        if self.procs.main:
            save_grid(final, self.save_folder / "sample-final.png")
            print("training completed")
