"""Mixed precision, decided once: which autocast dtype a run uses, and the context for it.

Under autocast the convolutions and matrix products run in bfloat16 or float16; the
schedule, q_sample's noise arithmetic and the loss stay in float32 (the autocast op lists
leave elementwise arithmetic alone, and Diffusion casts the model's output to float32).
"""
import contextlib

import torch

from hw2.errors import UserError

def cpu_has_native_bf16():
    """True on CPUs with bfloat16 instructions (AVX512-BF16 or AMX), where oneDNN runs bf16
    convolutions faster than float32; elsewhere bf16 on the CPU is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_dtype(choice, device):
    """The autocast dtype for --amp on this device, or None for float32 throughout.

    auto: bf16 on CUDA GPUs that support it, else fp16 on CUDA; bf16 on CPUs with native
    bf16; float32 on other CPUs and on MPS."""
    device = torch.device(device)
    if choice == "off":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if choice == "fp16":
        if device.type != "cuda":
            raise UserError("--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off here")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """The one autocast context of the project (a no-op for float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
