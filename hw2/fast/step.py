"""Levers on the whole training step (hw2/step.py), for CUDA GPUs, where the homework's step is
bound by kernel launches (thousands of small kernels, each costing the host about 10 us to
launch), not by arithmetic:

- captured_step: the step recorded once in a CUDA graph and replayed every step (about 1 us
  a kernel). Its t and noise come from the device's default generator inside the graph,
  which advances it by as much per replay as the eager step does, so a resumed run draws
  what an uninterrupted one would. The first WARMUP_STEPS steps run eagerly, on a side
  stream, as torch asks before a capture.
- joined_passes: the accumulation passes as one pass of passes x B images where the device
  has the memory: the same images, t and noise (drawn in the same order), the same loss (a
  mean of equal-sized means; the norms are per image), half the kernels. On a CPU it pays
  under bf16 autocast only (float32's larger pass runs slower there: hw2/fast/README.md).

Where a capture cannot hold (several processes, float16's dynamic loss scaling, a torch
older than the captures have run on), the step runs eagerly and plan() says why. Where a
capture fails (a layer that reads a value on the host, an optimizer not built capturable),
the step runs eagerly from the state it had before the capture, after one note. Every CUDA
call goes through hw2/fast/cuda.py, which the tests replace by a fake.
"""
import copy

import torch

from hw2.errors import shorten
from hw2.fast import cuda
from hw2.precision import warn_once

WARMUP_STEPS = 3  # eager steps before the capture (torch's examples use a few)
JOIN_MEMORY_SHARE = 0.5  # on CUDA the joined pass may take at most this share of the device's free memory
CPU_JOIN_PIXELS = 64 * 32 * 32  # on a CPU, joined passes of at most this many pixels: the homework's 2 x 32 images


def plan(device, amp_dtype, processes, config):
    """(capture, why): whether a run on `device` with this autocast dtype, these processes
    (hw2.distributed.Processes) and this hw2.config.Config captures its training step, and in a
    few words why not. --cuda_graph: None, wherever it holds; False, never. --plain: never."""
    device = torch.device(device)
    if config.plain:
        return False, "--plain"
    if config.cuda_graph is False:
        return False, "--cuda_graph False"
    if not cuda.calls().holds(device):
        return False, f"no CUDA graphs on {device.type}"
    if processes is not None and processes.distributed:
        return False, "several processes"
    if amp_dtype == torch.float16:
        return False, "float16's dynamic loss scaling"
    if not cuda.tested_torch():
        since = ".".join(map(str, cuda.CAPTURED_SINCE))
        return False, f"torch {torch.__version__}: the capture has run on torch {since} and newer only"
    return True, None


def describe(device, amp_dtype, processes, config):
    """The start-up line's words on the training step, on a CUDA GPU; None elsewhere."""
    if not cuda.calls().holds(device):
        return None
    capture, why = plan(device, amp_dtype, processes, config)
    return "the training step in one CUDA graph" if capture else f"the training step eager ({why})"


class CudaStep:
    """A hw2.step.TrainStep on a CUDA GPU: warm-up steps eagerly on a side stream, deciding on
    the joined pass, then (capture) the step captured once and replayed. Called like the step,
    it returns the loss as a tensor of its own; `load` and `inputs` are the step's."""

    def __init__(self, step, capture=True, join=True):
        self.step = step
        self.capture = capture
        self.join = join  # joined_passes: decided after the first warm-up step
        self.graph = None
        self.warm_steps = 0
        self.failed = None  # why a capture failed, once it has

    @property
    def inputs(self):
        return self.step.inputs

    def load(self, batches):
        self.step.load(batches)

    def __call__(self):
        if self.graph is not None:
            return self.graph.replay().clone()  # the graph's loss is rewritten by the next replay
        if self.warm_steps < WARMUP_STEPS:
            return self.warm_up()
        if self.capture and not self.failed:
            return self.record()
        return self.step()

    def warm_up(self):
        """One step on a side stream, deciding on the joined pass after the first."""
        calls, device, first = cuda.calls(), self.step.device, self.warm_steps == 0
        if first:
            calls.reset_peak_memory(device)
            before = calls.memory_allocated(device)
        with calls.side_stream(device):
            loss = self.step()
        self.warm_steps += 1
        if first and self.join and self.step.passes > 1:
            pass_bytes = calls.peak_memory(device) - before
            self.step.joined = self.step.passes * pass_bytes <= JOIN_MEMORY_SHARE * calls.free_memory(device)
        return loss

    def record(self):
        """Capture the step, then replay it for this step. A failed capture leaves the weights,
        the optimizer and the generator as they were before it, and the step runs eagerly."""
        step, calls = self.step, cuda.calls()
        before = Saved(step, calls)
        step.autocast_cache = False  # torch: no autocast weight cache inside a capture
        step.opt.zero_grad(set_to_none=True)
        try:
            self.graph = calls.capture(step, step.device)
        except Exception as e:  # noqa: BLE001 - whatever cannot be captured: run eagerly, say why
            self.failed = f"{type(e).__name__}: {shorten(e)}"
            trouble = calls.trouble(step.device)
            if trouble:
                raise cuda.CaptureBroke(f"the training step could not be captured in a CUDA graph ({self.failed}) "
                                        f"and the GPU did not recover ({trouble})") from None
            before.restore()
            step.autocast_cache = True
            warn_once(f"note: the training step could not be captured in a CUDA graph ({self.failed}); "
                      f"it runs eagerly")
            return step()
        return self.graph.replay().clone()


class Saved:
    """What a training step changes, as it was: the weights, the optimizer's state and the
    device's generator (a failed capture may have run part of the step)."""

    def __init__(self, step, calls):
        self.step, self.calls = step, calls
        self.params = [p.detach().clone() for p in parameters(step.opt)]
        self.opt = copy.deepcopy(step.opt.state_dict())
        self.rng = calls.rng_state(step.device)

    def restore(self):
        step = self.step
        step.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, saved in zip(parameters(step.opt), self.params, strict=True):
                p.copy_(saved)
        step.opt.load_state_dict(self.opt)
        self.calls.set_rng_state(self.rng, step.device)


def parameters(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def for_trainer(step, config):
    """The step the Trainer calls, as the run's hw2.config.Config asks: on CUDA a CudaStep
    (captured where plan() allows); on a CPU under bf16 autocast, with its passes joined
    where they are no larger than the homework's (CPU_JOIN_PIXELS); with --plain, step itself."""
    if config.plain:
        return step
    if cuda.calls().holds(step.device):
        capture, _ = plan(step.device, step.amp_dtype, step.procs, config)
        return CudaStep(step, capture=capture)
    if step.device.type == "cpu" and step.amp_dtype == torch.bfloat16:
        passes, b, _, h, w = step.inputs.shape
        step.joined = passes > 1 and passes * b * h * w <= CPU_JOIN_PIXELS
    return step
