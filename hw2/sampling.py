"""Drawing images from a trained model, for milestones and for --sample."""
import math

import torch
from tqdm.auto import tqdm

from hw2 import kernels
from hw2.distributed import Processes
from hw2.precision import autocast

GPU_PASS = 256  # images per pass through the reverse chain on a GPU: as many as memory allows
CPU_PASS_BYTES = 2**17  # on a CPU: pixels x bytes per element in one pass (32 images of 32 x 32 in float32)
CPU_KERNEL_PASS_BYTES = 2**18  # the same where the attention kernel runs (64 images of 32 x 32 in float32)


def images_per_pass(device, image_size, amp_dtype=None):
    """How many images go through the reverse chain together. A GPU wants big passes. A CPU
    is fastest with passes as big as they can be while the largest temporaries stay below
    32 MiB, the largest block glibc's malloc serves from its heap rather than mapping it fresh
    from the kernel (hw2/memory.py). In torch's linear attention those are the top level's 128
    features per pixel, 16 MiB for 32 images of 32 px in float32: drawing 64 images of 32 px
    here, float32, took 10.0-10.5 s in passes of 32, 11.2-12.7 s in passes of 16, 13.4-13.8 s
    in one pass of 64; bf16, with half the bytes, 7.3 s in one pass of 64, 7.8-7.9 s in passes
    of 32. The compiled attention kernel (hw2/kernels.py) keeps them in per-thread blocks, so
    where it runs the passes are twice as large: 64 images, float32, 6.24 s in one pass, 6.72 s
    in passes of 32 (benchmarks/README.md)."""
    if torch.device(device).type != "cpu":
        return GPU_PASS
    element = torch.finfo(amp_dtype or torch.float32).bits // 8
    kernel = kernels.kernel() is not None and image_size**2 % kernels.PIXELS_PER_VECTOR == 0
    return max(1, (CPU_KERNEL_PASS_BYTES if kernel else CPU_PASS_BYTES) // (image_size**2 * element))


@torch.inference_mode()
def generate(sampler, n, seed, amp_dtype=None, procs=None, progress=False):
    """n images (n, C, H, W) in [0, 1] on the CPU, drawn by the Diffusion `sampler` from a
    generator of their own (seeded with seed), so that sampling never disturbs the training
    randomness. Under torchrun every process draws a share and all of them get all n."""
    procs = procs or Processes()
    sampler.model.eval()
    device = sampler.device
    share = math.ceil(n / procs.world)
    generator = torch.Generator(device=device).manual_seed(seed + 7919 * procs.rank)
    per_pass = images_per_pass(device, sampler.image_size, amp_dtype)
    chunks = range(0, share, per_pass)
    steps = min(sampler.sampling_timesteps, sampler.num_timesteps)
    with tqdm(total=len(chunks) * steps, desc=f"sampling {n} images", unit="step", leave=False,
              disable=not (progress and procs.main)) as bar, autocast(device, amp_dtype):
        images = [sampler.sample(min(per_pass, share - start), generator=generator, progress=bar).float()
                  for start in chunks]
    return procs.gather(torch.cat(images))[:n].cpu()
