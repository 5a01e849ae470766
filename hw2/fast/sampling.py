"""Sampling, said once: the context in which the sampling-only levers apply, and how many
images go through the reverse chain together."""
import contextlib

import torch

from hw2.fast import cuda, kernel
from hw2.fast.network import is_fast
from hw2.fast.state import reset_sampling, set_sampling

PLAIN_PASS = 64  # images per pass without the pass_size lever: the homework's grid
GPU_PASS = 256  # images per pass on a GPU: as many as memory allows
CPU_PASS_BYTES = 2**17  # on a CPU: pixels x bytes per element in one pass (32 images of 32 x 32 in float32)
CPU_KERNEL_PASS_BYTES = 2**18  # the same where the attention kernel runs (64 images of 32 x 32 in float32)


@contextlib.contextmanager
def sampling(model):
    """Inference over many passes while model's weights stay as they are (a whole reverse chain):
    no gradient, and the levers that hold only then (the attention kernel, channels-last maps
    on a CPU, base-2 softmaxes) switch on. For a plain model it is torch.inference_mode() alone."""
    token = set_sampling(True)
    try:
        with torch.inference_mode():
            yield model
    finally:
        reset_sampling(token)


def images_per_pass(model, device, image_size, amp_dtype=None, sized=None):
    """How many images go through the reverse chain together. With the pass_size lever, on a
    CPU: passes as big as they can be while the largest temporaries stay below 32 MiB, the
    largest block glibc's malloc serves from its heap rather than mapping it fresh from the
    kernel (hw2/fast/memory.py). In torch's linear attention those are the top level's 128
    features per pixel; the compiled attention kernel keeps them in per-thread blocks, so where
    it runs the passes are twice as large. On a GPU, GPU_PASS. The lever is a run's setting:
    on for a fast model unless `sized` says otherwise (benchmarks/levers.py leaves it out)."""
    if not (is_fast(model) if sized is None else sized):
        return PLAIN_PASS
    if not cuda.is_cpu(device):
        return GPU_PASS
    element = torch.finfo(amp_dtype or torch.float32).bits // 8
    in_kernel = ("attention_kernel" in model.levers and kernel.kernel() is not None
                 and image_size**2 % kernel.PIXELS_PER_VECTOR == 0)
    return max(1, (CPU_KERNEL_PASS_BYTES if in_kernel else CPU_PASS_BYTES) // (image_size**2 * element))
