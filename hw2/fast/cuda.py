"""The CUDA calls the captures make (hw2/fast/step.py, hw2/fast/replay.py), in one place.

Capturing a CUDA graph takes a handful of calls: capture a callable and replay it, run on a
side stream, read the memory figures, synchronize, read and set the device's generator, and
check the device still works after a capture failed. They live here, behind calls(), so that
the tests (and `benchmarks/gpu_check.py --dry`) can put hw2/fast/fake_cuda.py in their place
with use() and run every other line of the captures on a CPU.

    calls()       the calls in use: Cuda below, or the fake that use() installed
    use(fake)     a context in which calls() is fake
    tested_torch  whether this torch is one the captures have run on (CAPTURED_SINCE)
"""
import contextlib

import torch

from hw2.errors import shorten

# The oldest torch the captures have run on (an H200, torch 2.11.0+cu130). Below it the
# training step and sampling run eagerly: torch.cuda.graph's handling of a failed capture
# changed over the 2.x releases, and an older one may leave the process unusable.
CAPTURED_SINCE = (2, 11)


class CaptureBroke(RuntimeError):
    """A capture failed and left the device unusable: the run stops (its last checkpoint is whole)."""


def torch_version(version=None):
    """(major, minor) of a torch version string, this torch's by default."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int(minor)


def tested_torch(version=None):
    return torch_version(version) >= CAPTURED_SINCE


class Graph:
    """fn() recorded once in a CUDA graph (nothing runs until the first replay). replay() runs
    the recorded work and returns fn's outputs: the same tensors every time, rewritten by
    every replay."""

    def __init__(self, fn):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs


class Cuda:
    """The calls on a CUDA GPU."""

    def holds(self, device):
        """Whether graphs can be captured on device."""
        return torch.device(device).type == "cuda"

    def capture(self, fn, device):
        """A Graph of fn. When the capture fails, the stream that was current is current again
        (torch.cuda.graph leaves its capture stream current when ending the capture raises),
        then the error goes on."""
        stream = torch.cuda.current_stream(device)
        try:
            return Graph(fn)
        except BaseException:
            torch.cuda.set_stream(stream)
            raise

    @contextlib.contextmanager
    def side_stream(self, device):
        """Run the body on a stream of its own, as torch asks of the work before a capture."""
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def reset_peak_memory(self, device):
        torch.cuda.reset_peak_memory_stats(device)

    def memory_allocated(self, device):
        return torch.cuda.memory_allocated(device)

    def peak_memory(self, device):
        return torch.cuda.max_memory_allocated(device)

    def free_memory(self, device):
        return torch.cuda.mem_get_info(device)[0]

    def synchronize(self, device):
        torch.cuda.synchronize(device)

    def rng_state(self, device):
        return torch.cuda.get_rng_state(device)

    def set_rng_state(self, state, device):
        torch.cuda.set_rng_state(state, device)

    def trouble(self, device):
        """After a failed capture: None when the device works (it synchronizes, and its
        generator draws), else what fails. The draw advances the generator: the caller sets
        it back."""
        try:
            torch.cuda.synchronize(device)
            torch.randn(1, device=device)
            torch.cuda.synchronize(device)
        except RuntimeError as e:
            return shorten(e) or type(e).__name__
        return None


_calls = Cuda()


def calls():
    return _calls


@contextlib.contextmanager
def use(fake):
    """calls() is `fake` inside the context (hw2/fast/fake_cuda.py), Cuda again after it."""
    global _calls
    before, _calls = _calls, fake
    try:
        yield fake
    finally:
        _calls = before
