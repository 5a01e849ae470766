"""One training step's device work, in one place: the passes (each with its own t and
noise), their backward, and the optimizer step.

The images of a step wait in fixed buffers (`inputs`, one (B, C, S, S) slice per pass, in
[-1, 1]) and the loss stays on the device, so nothing here waits for the host. What is host
work stays with the caller (Trainer.train_step): the next batches into the buffers, reading
the loss and checking it, logging, EMA. hw2.fast.graph replays this same step from a CUDA
graph; the benchmarks time it as the Trainer runs it.
"""
import contextlib

import torch

from hw2.data import Batches
from hw2.distributed import Processes
from hw2.precision import autocast


def no_phase(name):
    """The default for TrainStep's `phase`: a phase is not observed."""
    return contextlib.nullcontext()


class TrainStep:
    def __init__(self, diffusion, opt, *, batch_size, passes=1, amp_dtype=None, scaler=None, processes=None,
                 train_module=None):
        """diffusion: a Diffusion on its device; opt: the optimizer over its model's parameters;
        batch_size: images per pass (B); passes: forward/backward passes per optimizer step
        (gradient_accumulate_every); amp_dtype: the autocast dtype, None for float32; scaler: a
        torch.amp.GradScaler (float16's loss scaling) or None; processes: this process's place
        among torchrun's (hw2.distributed), None when alone; train_module: what the loss is
        computed through (DistributedDataParallel's wrapper of diffusion), default diffusion."""
        self.diffusion = diffusion
        self.module = train_module or diffusion
        self.opt = opt
        self.passes = passes
        self.amp_dtype = amp_dtype
        self.autocast_cache = True  # autocast's cache of cast weights; a captured step turns it off
        self.scaler = scaler or torch.amp.GradScaler(diffusion.device.type, enabled=False)
        self.procs = processes or Processes()
        self.device = diffusion.device
        self.joined = False  # the passes as one pass of passes x B images (hw2.fast.graph decides)
        c, s = diffusion.channels, diffusion.image_size
        self.inputs = torch.zeros((passes, batch_size, c, s, s), device=self.device)

    def load(self, batches):
        """Host work: `passes` uint8 batches (B, C, S, S) into the buffers, as the model takes them."""
        for buffer, batch in zip(self.inputs, batches, strict=True):
            buffer.copy_(Batches.to_model(batch, self.device))

    def draw(self):
        """[(t (B,), eps (B, C, S, S))] for each pass, in pass order, from the device's default
        generator. Every process draws them for the whole global batch and keeps its slice, as
        the data pipeline does."""
        b, world, rank = self.inputs.shape[1], self.procs.world, self.procs.rank
        mine = slice(rank * b, (rank + 1) * b)
        draws = []
        for _ in range(self.passes):
            t = torch.randint(0, self.diffusion.num_timesteps, (b * world,), device=self.device)
            noise = torch.randn((b * world, *self.inputs.shape[2:]), device=self.device)
            draws.append((t[mine], noise[mine]))
        return draws

    def __call__(self, phase=no_phase):
        """One optimizer step on the images in `inputs`; returns this process's mean loss over
        the passes, a 0-dim tensor on the device. phase(name) is entered around each part
        ("data", "forward", "backward", "optimizer"), for a profiler."""
        with phase("data"):
            draws = self.draw()
        if self.joined:  # one pass: the mean over all images is the mean of the passes' equal-sized means
            t, noise = (torch.cat(z) for z in zip(*draws))
            passes = [(self.inputs.flatten(0, 1), t, noise, 1)]
        else:
            passes = [(x_0, t, noise, self.passes) for x_0, (t, noise) in zip(self.inputs, draws)]
        total = torch.zeros((), device=self.device)
        for k, (x_0, t, noise, share) in enumerate(passes):
            # processes exchange gradients once per step, on its last pass
            last = k == len(passes) - 1
            sync = contextlib.nullcontext() if last or not self.procs.distributed else self.module.no_sync()
            with sync:
                with phase("forward"), autocast(self.device, self.amp_dtype, cache=self.autocast_cache):
                    loss = self.module(x_0, noise=noise, t=t) / share
                with phase("backward"):
                    self.scaler.scale(loss).backward()
            total += loss.detach()
        with phase("optimizer"):
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        return total
