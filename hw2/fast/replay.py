"""captured_sampling: while sampling on a CUDA GPU, one network evaluation per pass shape is
captured in a CUDA graph and replayed at every step of the reverse chain.

A sampling pass of the homework's model is thousands of small kernels, each costing the host
about 10 us to launch, and about 1 us replayed from a graph. The graph reads the weights where
they are, so training and EMA, which update them in place, need no new capture; a key of the
parameters' addresses catches weights that were replaced rather than updated. The
evaluation's input is copied into the graph's own buffers, its output out of them. Every CUDA
call goes through hw2/fast/cuda.py, which the tests replace by a fake.
"""
import weakref

import torch

from hw2.fast import cuda
from hw2.precision import warn_once

WARMUP_EVALUATIONS = 2  # eager evaluations, on a side stream, before a capture (as torch asks)
MAX_SHAPES = 4  # graphs kept per model (a run uses one or two pass shapes); each holds its activations

_graphs = weakref.WeakKeyDictionary()  # model -> {key: (graph, x, time)}
_failed = weakref.WeakSet()  # models whose evaluation could not be captured: they run eagerly


def autocast_dtype(device):
    kind = torch.device(device).type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def replayed(model, forward, x, time):
    """forward(x, time) for model, from a graph captured for x's shape (captured at first use)."""
    if model in _failed or not cuda.tested_torch():
        return forward(x, time)
    key = (tuple(x.shape), x.dtype, x.device, autocast_dtype(x.device), tuple(p.data_ptr() for p in model.parameters()))
    graphs = _graphs.setdefault(model, {})
    if key not in graphs:
        if len(graphs) >= MAX_SHAPES:
            graphs.clear()
        try:
            graphs[key] = capture(forward, x, time)
        except Exception as e:  # noqa: BLE001 - a layer that cannot be captured: sample eagerly, say why
            trouble = cuda.calls().trouble(x.device)
            if trouble:
                raise cuda.CaptureBroke(f"sampling could not be captured in a CUDA graph ({type(e).__name__}) and the "
                                   f"GPU did not recover ({trouble})") from None
            _failed.add(model)
            warn_once(f"note: sampling could not be captured in a CUDA graph ({type(e).__name__}); it runs eagerly")
            return forward(x, time)
    graph, static_x, static_time = graphs[key]
    static_x.copy_(x)
    static_time.copy_(time)
    return graph.replay().clone()


def capture(forward, x, time):
    """(graph, x, time): forward captured on buffers of x's and time's shapes."""
    calls = cuda.calls()
    static_x, static_time = x.clone(), time.clone()
    dtype = autocast_dtype(x.device)
    # autocast's cache of cast weights would hand the graph tensors it frees: off, as torch asks
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                        cache_enabled=False):
        with calls.side_stream(x.device):
            for _ in range(WARMUP_EVALUATIONS):
                forward(static_x, static_time)
        graph = calls.capture(lambda: forward(static_x, static_time), x.device)
    return graph, static_x, static_time
