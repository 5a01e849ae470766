"""captured_sampling: while sampling on a CUDA GPU, one network evaluation per pass shape is
captured in a CUDA graph and replayed at every step of the reverse chain.

A sampling pass of the homework's model is thousands of small kernels, each costing the host
about 10 us to launch, and about 1 us replayed from a graph. The graph reads the weights where
they are, so training and EMA, which update them in place, need no new capture; a key of the
parameters' addresses catches weights that were replaced rather than updated. The
evaluation's input is copied into the graph's own buffers, its output out of them.

As for the training step (hw2/fast/step.py): the last warm-up evaluation runs under
hw2/fast/watch.py, and what it finds keeps the model's sampling eager; the first replay is
compared with that eager evaluation of the same input (watch.TOLERANCE); a capture that fails
all the same leaves sampling eager where the device recovered, and raises CaptureBroke where it
did not. The lever is off with --cuda_graph False (hw2.fast.for_run). Every CUDA call goes
through hw2/fast/cuda.py, which the tests replace by a fake.
"""
import weakref

import torch

from hw2.fast import cuda
from hw2.fast.watch import TOLERANCE, unsaid, watch
from hw2.precision import warn_once

WARMUP_EVALUATIONS = 2  # eager evaluations, on a side stream, before a capture (as torch asks); the last is watched
MAX_SHAPES = 4  # graphs kept per model (a run uses one or two pass shapes); each holds its activations

_graphs = weakref.WeakKeyDictionary()  # model -> {key: (graph, x, time)}
eager = weakref.WeakKeyDictionary()  # model -> why its evaluations run eagerly
agreed = weakref.WeakKeyDictionary()  # model -> how far its first replay was from an eager evaluation


class Eager(Exception):
    """The evaluation cannot be captured, and why: the model samples eagerly; `said`, whether a note
    already named the reason (the training step's watch, which found the same lines)."""

    def __init__(self, why, said=False):
        super().__init__(why)
        self.said = said


def autocast_dtype(device):
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def replayed(model, forward, x, time):
    """forward(x, time) for model, from a graph captured for x's shape (captured at first use)."""
    if model in eager:
        return forward(x, time)
    key = (tuple(x.shape), x.dtype, x.device, autocast_dtype(x.device), tuple(p.data_ptr() for p in model.parameters()))
    graphs = _graphs.setdefault(model, {})
    if key not in graphs:
        if len(graphs) >= MAX_SHAPES:
            graphs.clear()
        try:
            graphs[key], out = capture(model, forward, x, time)
            return out
        except Eager as e:
            eager[model] = str(e)
            if not e.said:
                warn_once(f"note: sampling runs eagerly, not in a CUDA graph: {e}")
            return forward(x, time)
    graph, static_x, static_time = graphs[key]
    static_x.copy_(x)
    static_time.copy_(time)
    return graph.replay().clone()


def capture(model, forward, x, time):
    """((graph, x, time), the first replay's output): forward captured on buffers of x's and
    time's shapes, checked against an eager evaluation; raises Eager where it cannot be."""
    calls = cuda.calls()
    dtype = autocast_dtype(x.device)
    # Out of inference mode (without gradients all the same), where torch takes composite operators
    # (einsum) apart before the watch's dispatch mode sees them: under inference mode the mode would
    # run them whole, below autocast. And autocast's cache of cast weights would hand the graph
    # tensors it frees: off, as torch asks.
    with torch.inference_mode(False), torch.no_grad(), \
            torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None, cache_enabled=False):
        static_x, static_time = x.clone(), time.clone()
        with calls.side_stream(x.device):
            for _ in range(WARMUP_EVALUATIONS - 1):
                forward(static_x, static_time)
            with watch(x.device) as found:
                reference = forward(static_x, static_time).clone()
        if found:
            raise Eager(f"a graph cannot hold {'; '.join(found)}", said=not unsaid(found))
        try:
            graph = calls.capture(lambda: forward(static_x, static_time), x.device)
            out = graph.replay().clone()
        except Exception as e:  # noqa: BLE001 - a layer that cannot be captured: sample eagerly, say why
            why = f"its capture failed ({cuda.cause(e)})"
            trouble = cuda.trouble(x.device)
            if trouble:
                raise cuda.CaptureBroke(f"sampling could not be captured in a CUDA graph: {why}, and the GPU did not "
                                        f"recover ({trouble})") from None
            raise Eager(why) from None
    apart = ((out.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-12)).item()
    if not apart <= TOLERANCE:  # NaN included
        raise Eager(f"its first replay differed from an eager evaluation by {apart:.1e} (more than {TOLERANCE:.0e})")
    agreed[model] = apart
    return (graph, static_x, static_time), out


def path(model):
    """How model's sampling ran on CUDA, for a run's last lines; None where it never sampled there."""
    if model in eager:
        return f"sampling eager ({eager[model]})"
    if model in agreed:
        return (f"sampling captured in CUDA graphs; the first replay agreed with an eager evaluation to "
                f"{agreed[model]:.1e}")
    return None
