"""Training on several processes with torchrun and DistributedDataParallel.

    torchrun --nproc_per_node N main.py ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 the run joins a process
group (NCCL, one GPU per process, when CUDA is used; gloo on the CPU). Every process holds
the same model, data order and random state; each takes its own slice of every global
batch (batch_size images per process, batch_size x N per step in all) and of the random
timesteps and noise drawn for it, so N processes at batch b compute what one process at
batch N x b would. Only rank 0 prints, logs and writes files.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Collectives wait at most this long for a process that has died or hangs, then fail.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self):
        """The process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.world > 1

    def mean(self, value):
        """The mean of a tensor over all processes (the tensor itself when alone)."""
        if self.distributed:
            value = value.detach().to(self.device, copy=True)
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world
        return value

    def any(self, flag):
        """True on every process when flag is true on any of them."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    @property
    def device(self):
        """Where collectives' tensors live: the process's GPU under NCCL, else the CPU."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def gather(self, tensor):
        """Concatenate equally shaped tensors from every process along dim 0, in rank order."""
        if not self.distributed:
            return tensor
        # out of inference mode (sampling gathers in it): torch 2.4's gloo writes the parts in place
        # from a thread of its own, where inference tensors may not be written
        with torch.inference_mode(False):
            tensor = tensor.to(self.device).clone(memory_format=torch.contiguous_format)
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            dist.all_gather(parts, tensor)
            return torch.cat(parts)

    def barrier(self):
        if self.distributed:
            dist.barrier()


def start(device_choice):
    """(Processes, device or None). Joins torchrun's process group when there is one;
    the device is returned only then (one GPU per process), else main.py picks it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_choice.startswith("cuda") or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return Processes(rank, world, local_rank), device


def stop(finished):
    """Leave the process group. After a run that finished, every process first waits for the
    others: a process that tears down its connections while a peer is still completing the
    last collective can abort inside gloo. After a failure, no waiting (a peer may be gone)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
