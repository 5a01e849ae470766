"""Mixed precision, decided once: which autocast dtype a run uses, why, and the context for it.

Under autocast the convolutions and matrix products run in bfloat16 or float16; the
schedule, q_sample's noise arithmetic and the loss stay in float32 (the autocast op lists
leave elementwise arithmetic alone, and Diffusion casts the model's output to float32).

What --amp auto picks, the fastest for this model where measured (benchmarks/README.md):
- CUDA: float32 (on TF32 tensor cores where the GPU has them, hw2.fast.tune_process). The
  homework's model is too small for a GPU's arithmetic: its step is bound by kernel
  launches, autocast adds cast kernels to it, and float16's loss scaling keeps the step out
  of a CUDA graph (hw2/fast/step.py).
- CPUs with bfloat16 instructions (AVX512-BF16 or AMX): bfloat16; other CPUs and MPS: float32.

--amp bf16 and fp16 stay for those who ask. On CUDA below compute capability 8.0 (T4,
V100, RTX 20xx) bf16 is emulated and slow (torch.cuda.is_bf16_supported() says yes all
the same): fp16, with loss scaling (a GradScaler), uses their float16 tensor cores.
"""
import contextlib
import sys

import torch
from tqdm.auto import tqdm

from hw2.errors import UserError

NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs with bfloat16 tensor cores
_warned = set()  # warnings already printed by this process


def cpu_has_native_bf16():
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16
    convolutions faster than float32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_capability(device):
    return torch.cuda.get_device_capability(torch.device(device))


def cuda_has_native_bf16(device):
    """bfloat16 tensor cores: compute capability 8.0 or newer (ROCm GPUs that run torch have them)."""
    if torch.version.hip:
        return True
    return tuple(cuda_capability(device)) >= NATIVE_BF16_CAPABILITY


def amp_dtype(choice, device):
    """The autocast dtype for --amp on this device, or None for float32 throughout."""
    device = torch.device(device)
    if choice == "off":
        return None
    if choice == "bf16":
        if device.type == "cuda" and not cuda_has_native_bf16(device):
            major, minor = cuda_capability(device)
            warn_once(f"note: --amp bf16 on a GPU of compute capability {major}.{minor}: bfloat16 is emulated there "
                      f"and slow; --amp fp16 uses its float16 tensor cores")
        return torch.bfloat16
    if choice == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off here")
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def warn_once(message):
    """message on stderr, once a process; on a line of its own while a progress bar is drawn."""
    if message not in _warned:
        _warned.add(message)
        tqdm.write(message, file=sys.stderr)


def describe_precision(choice, device, dtype):
    """What the start-up line says: the precision and, for --amp auto, why."""
    device = torch.device(device)
    name = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast with loss scaling"}[dtype]
    if choice != "auto":
        return f"{name} (--amp {choice})"
    if device.type == "cuda":
        return f"{name}: the fastest for this model on a GPU (its step is bound by kernel launches)"
    if device.type == "cpu":
        return f"{name}: this CPU {'has' if dtype else 'has no'} native bf16"
    return f"{name} on {device.type}"


def autocast(device, dtype, cache=True):
    """The one autocast context of the project (a no-op for float32). cache: autocast's cache
    of weights cast within the context (off inside a CUDA graph capture, as torch asks)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype, cache_enabled=cache)
