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

A capture is tried only where it can hold, and checked where it is made:
- plan() says no for several processes, float16's dynamic loss scaling, a torch without what a
  capture needs, --cuda_graph False, and (unless --cuda_graph True) an edited unet.py or
  diffusion.py, whose prints and counters a student expects to run at every step.
- The last warm-up step runs under hw2/fast/watch.py: a value read on the host, a host tensor,
  a generator of its own keep the step eager, with one note naming the line.
- At first use the captured step is compared with an eager step from the same state (weights,
  optimizer state and generator set back between them): beyond TOLERANCE the run goes on
  eagerly from the eager step's result, with one note.
- A capture that fails all the same leaves the state the eager step made, where the device
  recovered (hw2/fast/cuda.py's trouble()); where it did not (torch 2.11 and older leave their
  generator capturing), the run stops with CaptureBroke, which the caller turns into one line.
Every CUDA call goes through hw2/fast/cuda.py, which the tests replace by a fake.
"""
import copy

import torch

from hw2.fast import cuda
from hw2.fast.network import edited_files
from hw2.fast.watch import TOLERANCE, unsaid, watch
from hw2.precision import warn_once

WARMUP_STEPS = 3  # eager steps before the capture (torch's examples use a few); the last is watched
JOIN_MEMORY_SHARE = 0.5  # on CUDA the joined pass may take at most this share of the device's free memory
CPU_JOIN_PIXELS = 64 * 32 * 32  # on a CPU, joined passes of at most this many pixels: the homework's 2 x 32 images


def capture_rule(config):
    """(allowed, why not): whether this run's flags and code allow captures at all (the training
    step's and sampling's). --plain and --cuda_graph False: never; --cuda_graph True: always;
    by default, where unet.py and diffusion.py are as shipped."""
    if config.plain:
        return False, "--plain"
    if config.cuda_graph is False:
        return False, "--cuda_graph False"
    edited = edited_files()
    if edited and config.cuda_graph is None:
        verb = "was" if len(edited) == 1 else "were"
        return False, (f"{' and '.join(edited)} {verb} edited, so the model's Python (a print, a counter) runs at every "
                       f"step; --cuda_graph True captures it, and then that Python runs only while it is captured")
    return True, None


def plan(device, amp_dtype, processes, config):
    """(capture, why): whether a run on `device` with this autocast dtype, these processes
    (hw2.distributed.Processes) and this hw2.config.Config captures its training step, and in a
    few words why not."""
    device = torch.device(device)
    if config.plain:
        return False, "--plain"
    if not cuda.calls().holds(device):
        return False, f"no CUDA graphs on {device.type}"
    allowed, why = capture_rule(config)
    if not allowed:
        return False, why
    if processes is not None and processes.distributed:
        return False, "several processes"
    if amp_dtype == torch.float16:
        return False, "float16's dynamic loss scaling"
    lacking = cuda.calls().unsupported()
    if lacking:
        return False, lacking
    return True, None


def describe(device, amp_dtype, processes, config):
    """The start-up line's words on the training step, on a CUDA GPU; None elsewhere."""
    if not cuda.calls().holds(device):
        return None
    capture, why = plan(device, amp_dtype, processes, config)
    return "the training step in one CUDA graph, checked at first use" if capture else f"the training step eager ({why})"


class CudaStep:
    """A hw2.step.TrainStep on a CUDA GPU: warm-up steps eagerly on a side stream, deciding on
    the joined pass after the first and watching the last, then (capture) the step captured
    once, checked against an eager step, and replayed. Called like the step, it returns the loss
    as a tensor of its own; `load` and `inputs` are the step's. `path()` says how it ran."""

    def __init__(self, step, capture=True, join=True, why=None):
        self.step = step
        self.capture = capture
        self.join = join  # joined_passes: decided after the first warm-up step
        self.graph = None
        self.warm_steps = 0
        self.why = why  # why the step is not captured, where it is not
        self.failed = None  # why a capture was tried and given up
        self.agreement = None  # how far the first captured step was from the eager one

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
        """One step on a side stream: the join decided after the first, the last watched."""
        calls, device, first = cuda.calls(), self.step.device, self.warm_steps == 0
        watched = self.capture and self.warm_steps == WARMUP_STEPS - 1
        if first:
            calls.reset_peak_memory(device)
            before = calls.memory_allocated(device)
        with calls.side_stream(device):
            if watched:
                with watch(device) as found:
                    loss = self.step()
            else:
                loss = self.step()
        self.warm_steps += 1
        if first and self.join and self.step.passes > 1:
            pass_bytes = calls.peak_memory(device) - before
            self.step.joined = self.step.passes * pass_bytes <= JOIN_MEMORY_SHARE * calls.free_memory(device)
        if watched and found:
            self.capture, self.why = False, f"a graph cannot hold {'; '.join(found)}"
            if unsaid(found):
                warn_once(f"note: the training step runs eagerly, not in a CUDA graph: {self.why}")
        return loss

    def record(self):
        """An eager step, then the same step captured from the same state and replayed; the
        captured one goes on where the two agree, the eager one's result where they do not or
        the capture failed (and the device recovered)."""
        step, calls = self.step, cuda.calls()
        start = Saved(step, calls)
        with calls.side_stream(step.device):
            eager = step()
        done = Saved(step, calls)
        start.restore()
        step.autocast_cache = False  # torch: no autocast weight cache inside a capture
        try:
            self.graph = calls.capture(step, step.device)
            loss = self.graph.replay().clone()
        except Exception as e:  # noqa: BLE001 - whatever cannot be captured: run eagerly, say why
            self.graph = None
            self.give_up(f"its capture failed ({cuda.cause(e)})", done)
            return eager
        self.agreement = agreement(eager, loss, start, done, calls)
        if not self.agreement <= TOLERANCE:  # NaN included
            self.graph = None
            self.give_up(f"its first replay differed from an eager step by {self.agreement:.1e} (more than "
                         f"{TOLERANCE:.0e})", done)
            return eager
        return loss

    def give_up(self, why, done):
        """Go on eagerly from the eager step's result, after one note; or stop, where the device
        did not recover from the capture."""
        trouble = cuda.trouble(self.step.device)
        if trouble:
            raise cuda.CaptureBroke(f"the training step could not be captured in a CUDA graph: {why}, and the GPU did "
                                    f"not recover ({trouble})")
        done.restore()
        self.step.autocast_cache = True
        self.failed = why
        warn_once(f"note: the training step runs eagerly, not in a CUDA graph: {why}")

    def path(self):
        """How the step ran, for the run's last lines."""
        if self.graph is not None:
            return (f"the training step captured in a CUDA graph after {WARMUP_STEPS} eager warm-up steps; its first "
                    f"replay agreed with an eager step from the same state to {self.agreement:.1e} (tolerance "
                    f"{TOLERANCE:.0e})")
        return f"the training step eager ({self.failed or self.why or 'not captured'})"


def agreement(eager_loss, loss, start, done, calls):
    """How far (against watch.TOLERANCE) a captured step (its loss; the weights and generator
    now) is from the eager step (eager_loss; `done`) made from the same state (`start`): the
    larger of the loss's relative difference and the weights' largest difference over the step's
    largest update; inf where the generators differ (a resume would not continue the run)."""
    if not torch.equal(calls.rng_state(done.step.device), done.rng):
        return float("inf")
    loss_apart = ((loss - eager_loss).abs() / eager_loss.abs().clamp_min(1e-12)).item()
    now = parameters(done.step.opt)
    apart = max((p - e).abs().max().item() for p, e in zip(now, done.params, strict=True))
    update = max((e - s).abs().max().item() for e, s in zip(done.params, start.params, strict=True))
    return max(loss_apart, apart / max(update, 1e-30))


class Saved:
    """What a training step changes, as it was: the weights, the optimizer's state and the
    device's generator."""

    def __init__(self, step, calls):
        self.step, self.calls = step, calls
        self.params = [p.detach().clone() for p in parameters(step.opt)]
        self.opt = copy.deepcopy(step.opt.state_dict())
        self.rng = calls.rng_state(step.device).clone()

    def restore(self):
        step = self.step
        step.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, saved in zip(parameters(step.opt), self.params, strict=True):
                p.copy_(saved)
        step.opt.load_state_dict(copy.deepcopy(self.opt))
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
        capture, why = plan(step.device, step.amp_dtype, step.procs, config)
        return CudaStep(step, capture=capture, why=why)
    if step.device.type == "cpu" and step.amp_dtype == torch.bfloat16:
        passes, b, _, h, w = step.inputs.shape
        step.joined = passes > 1 and passes * b * h * w <= CPU_JOIN_PIXELS
    return step
