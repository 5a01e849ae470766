"""The CUDA calls the captures make (hw2/fast/step.py, hw2/fast/replay.py), in one place.

Capturing a CUDA graph takes a handful of calls: capture a callable and replay it, run on a
side stream, read the memory figures, synchronize, read and set the device's generator, have
torch report synchronizations while a step is watched (hw2/fast/watch.py), and probe whether
the device recovered after a capture failed. They live here, behind calls(), so that the
tests (and `benchmarks/gpu_check.py --dry`) can put hw2/fast/fake_cuda.py in their place with
use() and run every other line of the captures on a CPU.

    calls()       the calls in use: Cuda below, or the fake that use() installed
    use(fake)     a context in which calls() is fake
    cause(error)  what made a capture fail, and where in unet.py or diffusion.py
    trouble(dev)  after a failed capture: what of the device does not work, or None
    is_cpu(dev)   a CPU, not the fake CUDA device's: where the CPU's levers act

What a capture needs of torch (torch.cuda.graph, capturable fused Adam, the default generator
inside a graph) is in every torch requirements.txt allows (2.4 and newer); what a *failed*
capture leaves behind is not: torch 2.11 and older leave the default generator capturing, so
that nothing random runs again in the process. So a capture is tried only after a watched
eager run found nothing it cannot hold, and after a failure trouble() says whether to go on.
"""
import contextlib
import inspect
import traceback
import warnings

import torch

from hw2.errors import shorten, student_line


def is_cpu(device):
    """Whether device is a CPU and not the fake CUDA device's: the levers for CPUs act there only, so that
    a run through the fake computes what a run on a GPU does."""
    return torch.device(device).type == "cpu" and not calls().holds(device)


class CaptureBroke(RuntimeError):
    """A capture failed and left the device unusable: the run stops (its last checkpoint is whole)."""


def cause(error):
    """'RuntimeError at unet.py:57: ...' for what made a capture fail: on a GPU, the error raised
    inside the capture, which capture_end's own error carries as its __context__."""
    while error.__context__ is not None and error.__context__ is not error:
        error = error.__context__
    where = student_line(traceback.extract_tb(error.__traceback__), fallback=True)
    return f"{type(error).__name__}{where}: {shorten(error)}"


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

    def unsupported(self):
        """None where this torch has what a capture of the step needs, else what it lacks."""
        if not hasattr(torch.cuda, "graph") or not hasattr(torch.cuda, "CUDAGraph"):
            return f"torch {torch.__version__} has no torch.cuda.graph"
        if "capturable" not in inspect.signature(torch.optim.Adam).parameters:
            return f"torch {torch.__version__}'s Adam has no capturable state"
        return None

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

    @contextlib.contextmanager
    def syncs_noted(self, device, note):
        """The body with torch's sync debug mode warning: each synchronization it reports is
        note(what, frames); other warnings go on as usual."""
        before = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(before)
        for w in seen:
            if "synchroniz" in str(w.message):
                note(f"a synchronization ({shorten(w.message, 80)})", [traceback.FrameSummary(w.filename, w.lineno, "")])
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def default_generator(self, device):
        index = torch.device(device).index
        return torch.cuda.default_generators[torch.cuda.current_device() if index is None else index]

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

    def recovery(self, device, every=False):
        """After a failed capture, the checks of whether the device works on, in order: {check: None
        where it passed, else its error}; up to the first that fails, or (every) all of them. The
        random draw advances the generator: the caller sets it back."""
        checks = {"synchronizing": lambda: torch.cuda.synchronize(device),
                  "a random draw": lambda: torch.randn(1, device=device),
                  "emptying the cache": torch.cuda.empty_cache,
                  "a new capture": lambda: tiny_graph(device),
                  "the default stream": lambda: default_stream_works(device)}
        results = {}
        for what, check in checks.items():
            try:
                check()
                torch.cuda.synchronize(device)
                results[what] = None
            except Exception as e:  # noqa: BLE001 - any failure here means the device did not recover
                results[what] = shorten(e, 100) or type(e).__name__
                if not every:
                    break
        return results

    def is_capturing(self, device):
        """Whether a capture is under way on device's current stream (for drills that fail only there)."""
        return torch.cuda.is_current_stream_capturing()


def tiny_graph(device):
    """Capture x + 1 and replay it; raise unless it gives 1."""
    x = torch.zeros(1, device=device)
    graph = Graph(lambda: x + 1)
    if graph.replay().item() != 1:
        raise RuntimeError("a replayed graph gave a wrong value")


def default_stream_works(device):
    if torch.cuda.current_stream(device) != torch.cuda.default_stream(device):
        raise RuntimeError("the current stream is not the default stream")
    if (torch.ones(2, device=device) * 2).sum().item() != 4:
        raise RuntimeError("a kernel on the default stream gave a wrong value")


def trouble(device):
    """After a failed capture: None where the device works on (calls().recovery), else the first
    check that failed and its error."""
    failed = [f"{what}: {error}" for what, error in calls().recovery(device).items() if error]
    return failed[0] if failed else None


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
        getattr(fake, "close", lambda: None)()
