"""A stand-in for hw2/fast/cuda.py's calls that runs on a CPU, for the tests and
`benchmarks/gpu_check.py --dry`: with it installed (hw2.fast.cuda.use), a run on the CPU
takes the path a run on a CUDA GPU takes (warm-up, the join decision, the capture, replays,
the fallback after a failed capture, captured sampling), and the fake counts what was asked
of it.

How it stands in:
- A graph runs the captured callable at capture (the work a GPU does at the first replay,
  which the fake then skips) and again at every later replay, writing the results into the
  tensors the capture returned, as a replayed graph rewrites its outputs.
- While it captures, reading a tensor's value on the host (item(), bool(), float() ...)
  and synchronizing raise, as they do in a CUDA capture. On a GPU that is what makes an
  edited layer, or an optimizer not built `capturable`, fail its capture.
- Its memory figures are the numbers it was given: `free` bytes free on the device, and
  `pass_bytes` taken by the first warm-up step (the step's own memory, for the join decision).
- Its generator is torch's CPU generator, which the step draws from on a CPU.
- `broken` (a reason) makes the device fail the check after a failed capture.

The fake runs on a CPU, where the levers that apply only on a CPU (the attention kernel,
base-2 softmaxes) may read values on the host while sampling: capture sampling through the
fake with the levers that apply on CUDA.
"""
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

CAPTURE_ERROR = "operation not permitted when stream is capturing (the fake CUDA device refuses it as CUDA would)"
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy}


def refuse(what):
    raise RuntimeError(f"{what}: {CAPTURE_ERROR}")


class NoHostReads(TorchFunctionMode):
    """Refuses the tensor methods that read a value on the host (seen under inference mode too)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            refuse(f"{func.__name__}()")
        return func(*args, **(kwargs or {}))


class NoHostReadsInBackward(TorchDispatchMode):
    """Refuses the operator through which every value reaches the host, which the backward pass's
    hooks reach (a torch function mode does not follow them there)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            refuse("reading a value on the host")
        return func(*args, **(kwargs or {}))


class FakeGraph:
    def __init__(self, fn, fake):
        self.fn = fn
        self.fake = fake
        with fake.capturing():
            self.outputs = fn()
        self.ran = True  # the capture did the first replay's work

    def replay(self):
        self.fake.replays += 1
        if self.ran:
            self.ran = False
            return self.outputs
        new = self.fn()
        with torch.no_grad():
            for old, fresh in zip(tensors(self.outputs), tensors(new), strict=True):
                old.copy_(fresh)
        return self.outputs


def tensors(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


class FakeCuda:
    def __init__(self, free=2**40, pass_bytes=2**20, broken=None):
        self.free = free
        self.pass_bytes = pass_bytes
        self.broken = broken
        self.captures = 0  # graphs captured (failed captures included)
        self.replays = 0
        self.side_streams = 0
        self.in_capture = False

    def holds(self, device):
        return torch.device(device).type == "cpu"

    @contextlib.contextmanager
    def capturing(self):
        self.captures += 1
        self.in_capture = True
        try:
            with NoHostReads(), NoHostReadsInBackward():
                yield
        finally:
            self.in_capture = False

    def capture(self, fn, device):
        return FakeGraph(fn, self)

    @contextlib.contextmanager
    def side_stream(self, device):
        self.side_streams += 1
        yield

    def reset_peak_memory(self, device):
        pass

    def memory_allocated(self, device):
        return 0

    def peak_memory(self, device):
        return self.pass_bytes

    def free_memory(self, device):
        return self.free

    def synchronize(self, device):
        if self.in_capture:
            raise RuntimeError(f"synchronize(): {CAPTURE_ERROR}")

    def rng_state(self, device):
        return torch.get_rng_state()

    def set_rng_state(self, state, device):
        torch.set_rng_state(state)

    def trouble(self, device):
        return self.broken
