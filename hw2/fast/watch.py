"""What a CUDA graph cannot hold, looked for before a capture is tried (hw2/fast/step.py,
hw2/fast/replay.py).

A graph records the device's work once and replays it without the host. So the work a capture
would record (a training step, a sampling pass) first runs once eagerly under watch(), and
the capture is tried only where that run found nothing of:
- a value read on the host: .item(), bool(), float(), .tolist(), printing a tensor, an `if`
  on a tensor (the host waits for the device, which a capture refuses);
- a tensor copied between the host and the device, or a host tensor in a device operation
  (the graph would keep the value it had at capture);
- a random draw from a generator of its own (a graph advances the device's default one only);
- any other synchronization torch reports (its sync debug mode, through hw2/fast/cuda.py).
Each finding says what and where: the line of unet.py or diffusion.py where there is one
(hw2.errors.student_line). The same watch runs on the fake CUDA device in the tests.

A capture that was made is then checked once against the eager work it stands for (TOLERANCE).
"""
import contextlib
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hw2 import precision
from hw2.errors import student_line
from hw2.fast import cuda

# the tensor methods that read a value on the host (a torch function mode sees them; some,
# tolist and numpy, never reach the dispatcher)
HOST_READS = {torch.Tensor.item: "a value read on the host (.item())",
              torch.Tensor.tolist: "a value read on the host (.tolist())",
              torch.Tensor.numpy: "a value read on the host (.numpy())",
              torch.Tensor.__bool__: "a tensor's truth read on the host (an `if` or `assert` on a tensor)",
              torch.Tensor.__int__: "a value read on the host (int())",
              torch.Tensor.__float__: "a value read on the host (float())",
              torch.Tensor.__index__: "a tensor used as a Python index", torch.Tensor.__repr__: "a tensor printed",
              torch.Tensor.__format__: "a tensor's value formatted"}
# a first replay against an eager run from the same state: relative differences of at most this
# (the same kernels agree to rounding; a graph that holds something else is far off)
TOLERANCE = 1e-3
RANDOM = "a random draw from a generator of its own (a graph advances only the device's default one)"
HERE = Path(__file__).name


def same_device(a, b):
    """Whether devices a and b are one (cuda and cuda:0 are, on a process whose device is 0)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def on(device, tensors):
    return any(isinstance(t, torch.Tensor) and same_device(t.device, device) for t in tensors)


class Found(list):
    """The findings of one watch(), as 'what at where' strings: the first few, one per line of code
    (a read seen by several of the watches is said once)."""

    LIMIT = 3

    def add(self, what, frames=None):
        frames = [f for f in (frames or traceback.extract_stack()) if Path(f.filename).name != HERE]
        where = student_line(frames, fallback=True)
        if len(self) < self.LIMIT and not (where and any(seen.endswith(where) for seen in self)):
            self.append(f"{what}{where}")


class HostReads(TorchFunctionMode):
    def __init__(self, device, found):
        super().__init__()
        self.device, self.found = device, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and on(self.device, args[:1]):
            self.found.add(HOST_READS[func])
        return func(*args, **(kwargs or {}))


class DeviceTraffic(TorchDispatchMode):
    """The operators under the tensor methods (the backward pass's hooks reach them too): values
    read on the host, copies between host and device, host tensors in device operations, and
    random draws from a generator other than the device's default."""

    def __init__(self, device, found, default_generator):
        super().__init__()
        self.device, self.found, self.default_generator = device, found, default_generator

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors} | ({torch.device(kwargs["device"])} if kwargs.get("device") else set())
        if func is torch.ops.aten._local_scalar_dense.default and on(self.device, tensors):
            self.found.add("a value read on the host")
        elif len({d.type for d in devices}) > 1 and any(same_device(d, self.device) for d in devices):
            self.found.add(f"{func.__name__.split('.')[0]} between host and device tensors (a graph keeps the "
                           f"host's values of capture time)")
        generator = kwargs.get("generator")
        if generator is not None and generator is not self.default_generator:
            self.found.add(RANDOM)
        return func(*args, **kwargs)


def unsaid(found):
    """The findings of found that no note of this process has named yet (they are named now: kept
    with hw2.precision's notes printed once)."""
    new = [f for f in found if ("finding", f) not in precision._warned]
    precision._warned.update(("finding", f) for f in new)
    return new


@contextlib.contextmanager
def watch(device):
    """Run the body as a capture would record it, noting what a graph cannot hold: yields a Found,
    empty when a capture can be tried."""
    device, calls = torch.device(device), cuda.calls()
    found = Found()
    with HostReads(device, found), DeviceTraffic(device, found, calls.default_generator(device)), \
            calls.syncs_noted(device, found.add):
        yield found
