"""A stand-in for hw2/fast/cuda.py's calls that runs on a CPU, for the tests and
`benchmarks/gpu_check.py --dry`: with it installed (hw2.fast.cuda.use), a run on the CPU
takes the path a run on a CUDA GPU takes (warm-up, the watched step, the join decision, the
capture, the first-use comparison, replays, the fallback after a failed capture, captured
sampling), and the fake counts what was asked of it.

How it stands in:
- A capture runs the callable once, recording every operator it dispatches with its tensors;
  that run is the first replay's work. Every later replay runs the recorded operators again on
  the same tensors, without the callable's Python, as a CUDA graph replays kernels: a print or a
  counter in the model runs while capturing and never at a replay, and what a recorded operator
  writes lands in the tensors the capture returned.
- While it captures, reading a tensor's value on the host (item(), bool(), float() ...) and
  synchronizing raise, as they do in a CUDA capture; the capture then ends with capture_end's own
  error, the first one its __context__, as torch.cuda.graph's does.
- A failed capture leaves the device as torch does: with `recovers` (torch 2.14, by its source, whose
  generators keep a state per capture) it works on; without it (torch 2.11 and older) the
  default generator is left capturing, so every later random draw and capture fails with
  torch's message, and its recovery checks say so. `broken` (a reason) fails them too.
- Its memory figures are the numbers it was given: `free` bytes free on the device, and
  `pass_bytes` taken by the first warm-up step (the step's own memory, for the join decision).
- Its generator is torch's CPU generator, which the step draws from on a CPU.
- `skew`: every replay's outputs times (1 + skew), a graph that computes something else, for
  the first-use comparison.

The fake runs on a CPU, where the levers that apply only on a CPU (the attention kernel, whose
compiled code no operator records) act: capture sampling through the fake with the levers that
apply on CUDA.

    python -m hw2.fast.fake_cuda [--old] main.py FLAGS   # main.py's command line on the fake device

runs a command as a student runs it, in a process of its own (the tests, gpu_check --dry): --old
makes the fake fail as torch 2.11 and older do; at the end it prints the fake's counts.
"""
import contextlib
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hw2.fast.watch import HOST_READS

CAPTURE_ERROR = "operation not permitted when stream is capturing (the fake CUDA device refuses it as CUDA would)"
CAPTURE_END_ERROR = "CUDA error: operation failed due to a previous error during capture (the fake CUDA device)"
LEFT_CAPTURING = "Offset increment outside graph capture encountered unexpectedly (the fake CUDA device: torch 2.11 " \
                 "and older leave the generator capturing after a failed capture)"
POOL_LEFT = "the allocator still routes memory to the failed capture's pool (the fake CUDA device, as torch 2.11 " \
            "and older)"


def refuse(what):
    raise RuntimeError(f"{what}: {CAPTURE_ERROR}")


class NoHostReads(torch.overrides.TorchFunctionMode):
    """Refuses the tensor methods that read a value on the host (some never reach the dispatcher)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            refuse(HOST_READS[func])
        return func(*args, **(kwargs or {}))


def storage(t):
    return t.untyped_storage().data_ptr()


class Recorder(TorchDispatchMode):
    """Records each operator a capture dispatches (the backward pass's too), refusing those that
    read a value on the host. For each, the results that are new tensors (not views of or
    updates to its inputs) are kept: a replay writes the operator's new results into them."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            refuse("a value read on the host")
        out = func(*args, **kwargs)
        if func.namespace == "profiler":  # torch's record_function marks: nothing for a graph to hold
            return out
        results = tree_flatten(out)[0]
        if any(isinstance(r, (bool, int, float)) for r in results):
            refuse(f"{func} gives a value on the host")
        inputs = {storage(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.numel()}
        new = [(k, r) for k, r in enumerate(results) if isinstance(r, torch.Tensor) and r.numel()
               and storage(r) not in inputs]
        self.ops.append((func, args, kwargs, new))
        return out


class FakeGraph:
    def __init__(self, fn, fake):
        self.fake = fake
        recorder = Recorder()
        try:
            with fake.capturing(), recorder:
                self.outputs = fn()
        except Exception:  # as on a GPU: ending the capture fails, the cause in the error's __context__
            raise RuntimeError(CAPTURE_END_ERROR)  # noqa: B904 - the cause stays the __context__, as torch's
        self.ops = recorder.ops
        self.ran = True  # the capture did the first replay's work

    def replay(self):
        self.fake.replays += 1
        if self.fake.left_capturing:
            raise RuntimeError(LEFT_CAPTURING)
        if self.ran:
            self.ran = False
        else:
            # the recorded operators as they were dispatched: below autograd and autocast
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                for func, args, kwargs, new in self.ops:
                    results = tree_flatten(func(*args, **kwargs))[0]
                    for k, kept in new:
                        kept.copy_(results[k])
        if self.fake.skew:
            with torch.no_grad():
                for t in tensors(self.outputs):
                    t.mul_(1 + self.fake.skew)
        return self.outputs


def tensors(outputs):
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


class LeftCapturing(TorchDispatchMode):
    """Every random draw fails, as on torch 2.11 and older once a capture failed."""

    RANDOM = ("rand", "randn", "randint", "normal", "uniform", "bernoulli", "random", "multinomial", "randperm")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0].rstrip("_") in self.RANDOM:
            raise RuntimeError(LEFT_CAPTURING)
        return func(*args, **(kwargs or {}))


class FakeCuda:
    def __init__(self, free=2**40, pass_bytes=2**20, broken=None, recovers=True, skew=0.0):
        self.free = free
        self.pass_bytes = pass_bytes
        self.broken = broken
        self.recovers = recovers
        self.skew = skew
        self.captures = 0  # graphs captured (failed captures included)
        self.replays = 0
        self.side_streams = 0
        self.in_capture = False
        self.left_capturing = None  # the LeftCapturing mode in force, once a capture failed (recovers=False)

    def holds(self, device):
        return torch.device(device).type == "cpu"

    def unsupported(self):
        return None

    @contextlib.contextmanager
    def capturing(self):
        if self.left_capturing:
            raise RuntimeError(LEFT_CAPTURING)
        self.captures += 1
        self.in_capture = True
        try:
            with NoHostReads():
                yield
        except BaseException:
            if not self.recovers:
                self.left_capturing = LeftCapturing()
                self.left_capturing.__enter__()
            raise
        finally:
            self.in_capture = False

    def close(self):
        """Called by hw2.fast.cuda.use as the fake is taken out: random draws work again."""
        if self.left_capturing:
            self.left_capturing.__exit__(None, None, None)
            self.left_capturing = None

    def capture(self, fn, device):
        return FakeGraph(fn, self)

    @contextlib.contextmanager
    def side_stream(self, device):
        self.side_streams += 1
        yield

    def syncs_noted(self, device, note):
        return contextlib.nullcontext()  # what a fake device has of torch's sync debug mode: nothing

    def default_generator(self, device):
        return torch.default_generator

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

    def recovery(self, device, every=False):
        """As hw2.fast.cuda.Cuda.recovery: `broken` fails the first check; a generator left capturing
        fails the draw, emptying the cache (the allocator's capture is left open too) and a new capture.
        The draw is made, as on a GPU: it advances the generator."""
        left = self.left_capturing is not None
        random, pool = (LEFT_CAPTURING, POOL_LEFT) if left else (None, None)
        if not (left or self.broken):
            torch.randn(1)
        results = {}
        for what, error in (("synchronizing", self.broken), ("a random draw", random), ("emptying the cache", pool),
                            ("a new capture", pool), ("the default stream", None)):
            results[what] = error
            if error and not every:
                break
        return results

    def is_capturing(self, device):
        return self.in_capture


def main(argv):
    """main.py's command line (argv: ["main.py", flags...], the main.py of the current folder) on
    a FakeCuda; --old first: one that does not recover from a failed capture."""
    old = argv[:1] == ["--old"]
    argv = argv[1:] if old else argv
    if argv[:1] != ["main.py"]:
        print("usage: python -m hw2.fast.fake_cuda [--old] main.py FLAGS", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path.cwd()))
    import main as command_line
    from hw2.fast import cuda

    with cuda.use(FakeCuda(recovers=not old)) as fake:
        try:
            return command_line.main(argv[1:], tune_process=True)
        finally:
            print(f"fake CUDA device: {fake.captures} captures, {fake.replays} replays", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
