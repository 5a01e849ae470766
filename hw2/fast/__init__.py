"""Speed, beside the homework's network: every lever that makes training or sampling faster
without changing what is computed. unet.py stays the starter's network; this package swaps
equivalents into it where its code is as shipped (same parameters, same state_dict keys, so
checkpoints are the same either way), and `main.py --plain` runs without any of them. hw2/fast/README.md lists the levers:
where each applies, what it buys on the homework's runs, and the test that holds it equal to
unet.py.

Entry points, the only names the rest of the project uses:
    for_run(model, config)        model (a unet.Unet) as a run's Config asks: fast, unless --plain
    speed_up(model)               make a fresh unet.Unet fast, in place (the levers that hold for this unet.py)
    edited_note()                 the start-up note on unet.py definitions edited, whose levers are off
    sampling(model)               the context for a reverse chain: the sampling-only levers
    images_per_pass(model, ...)   how many images one pass of the reverse chain draws
    make_adam(model, lr)          the optimizer
    step_plan(device, ...)        whether the training step is captured in a CUDA graph, and why not
    step_for_trainer(step, ...)   the training step as the Trainer calls it (hw2/fast/step.py)
    capture_paths(step, model)    how the step and sampling ran on CUDA, for a run's last lines
    tune_process()                process-wide settings, once, where the process starts
    CaptureBroke                  a failed capture left the GPU unusable (hw2/fast/cuda.py)
    describe(model, device)       the start-up line's words (with --verbose)
"""
import torch

from hw2.fast import cuda, kernel, replay
from hw2.fast.cuda import CaptureBroke
from hw2.fast.memory import keep_freed_memory
from hw2.fast.network import CPU_LEVERS, LEVERS, NETWORK_LEVERS, edited_note, is_fast, speed_up
from hw2.fast.sampling import images_per_pass, sampling
from hw2.fast.step import capture_rule, describe as describe_step, for_trainer as step_for_trainer, plan as step_plan

_process = {}  # what tune_process() did in this process: {"freed_memory": note or None}

__all__ = ["LEVERS", "CPU_LEVERS", "for_run", "speed_up", "edited_note", "is_fast", "sampling", "images_per_pass", "make_adam", "tune_process",
           "describe", "describe_step", "step_plan", "step_for_trainer", "capture_paths", "CaptureBroke"]


def for_run(model, config):
    """model as the run's hw2.config.Config asks: plain with --plain, else fast, with its
    --channels_last (None: the default rule), and captured sampling where --cuda_graph and the
    code allow captures (hw2/fast/step.py's capture_rule)."""
    if config.plain:
        return model
    levers = LEVERS if capture_rule(config)[0] else tuple(x for x in LEVERS if x != "captured_sampling")
    return speed_up(model, levers, channels_last=config.channels_last)


def capture_paths(step, model):
    """How the training step (the Trainer's, when given) and model's sampling ran on a CUDA GPU,
    one line each ('' where neither ran there)."""
    lines = [step.path()] if hasattr(step, "path") else []
    lines += [line for line in [replay.path(model)] if line]
    return "\n".join(lines)


def make_adam(model, lr, capturable=False, fused=None):
    """Adam over model's parameters. fused_adam: the fused kernel where this torch has it for
    these tensors (one kernel for all parameters instead of several per parameter; the same
    update), for a fast model unless `fused` says otherwise. capturable: its state kept on the
    device, so that a CUDA graph can hold its step (hw2/fast/step.py); torch holds a capturable
    Adam on a CPU (the fake CUDA device's) only fused."""
    params = list(model.parameters())
    options = {"capturable": True} if capturable else {}
    fused = is_fast(model) if fused is None else fused
    fused = fused or (capturable and params[0].device.type == "cpu")
    if fused and params[0].device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=lr, fused=True, **options)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, **options)


def tune_process():
    """Process-wide levers, set once where the process starts (main.py run as a script):
    freed_memory (glibc's malloc keeps freed blocks for reuse: hw2/fast/memory.py) and tf32
    (on CUDA, float32 products and convolutions on TF32 tensor cores, Ampere and newer, and
    cuDNN's autotuner; the price: a resumed run is not bitwise an uninterrupted one)."""
    _process["freed_memory"] = keep_freed_memory()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def describe(model, device):
    """One line for the start-up line: the levers in use, or that there are none."""
    if not is_fast(model):
        return "the homework's network as written, no speed levers (--plain)"
    words = [f"speed levers on ({len(model.levers)} of {len(NETWORK_LEVERS)} in the network; --plain for none)"]
    if cuda.is_cpu(device) and "attention_kernel" in model.levers:
        words.append(kernel.status())
    if _process.get("freed_memory"):
        words.append(_process["freed_memory"])
    return ", ".join(words)
