"""Drawing images from a trained model, for milestones and for --sample."""
import math

import torch
from tqdm.auto import tqdm

from hw2.distributed import Processes
from hw2.precision import autocast

GPU_PASS = 256  # images per pass through the reverse chain on a GPU: as many as memory allows
CPU_PASS_BYTES = 64  # on a CPU: 16 images per pass in float32, 32 in bfloat16


def images_per_pass(device, amp_dtype=None):
    """How many images go through the reverse chain together. A GPU wants big passes; a
    CPU is faster with passes whose activations stay in its caches: 64 images drawn in
    passes of 16 took 1.4x less time than in one pass, in float32 on a 2-core CPU
    (benchmarks/README.md), and half-precision activations take half the bytes."""
    if torch.device(device).type != "cpu":
        return GPU_PASS
    element = torch.finfo(amp_dtype or torch.float32).bits // 8
    return CPU_PASS_BYTES // element


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
    per_pass = images_per_pass(device, amp_dtype)
    chunks = range(0, share, per_pass)
    steps = min(sampler.sampling_timesteps, sampler.num_timesteps)
    with tqdm(total=len(chunks) * steps, desc=f"sampling {n} images", unit="step", leave=False,
              disable=not (progress and procs.main)) as bar, autocast(device, amp_dtype):
        images = [sampler.sample(min(per_pass, share - start), generator=generator, progress=bar).float()
                  for start in chunks]
    return procs.gather(torch.cat(images))[:n].cpu()
