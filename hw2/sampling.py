"""Drawing images from a trained model, for milestones and for --sample."""
import math

import torch
from tqdm.auto import tqdm

from hw2.distributed import Processes
from hw2.precision import autocast

SAMPLE_CHUNK = 256  # images per pass through the reverse chain


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
    chunks = range(0, share, SAMPLE_CHUNK)
    steps = min(sampler.sampling_timesteps, sampler.num_timesteps)
    with tqdm(total=len(chunks) * steps, desc=f"sampling {n} images", unit="step", leave=False,
              disable=not (progress and procs.main)) as bar, autocast(device, amp_dtype):
        images = [sampler.sample(min(SAMPLE_CHUNK, share - start), generator=generator, progress=bar).float()
                  for start in chunks]
    return procs.gather(torch.cat(images))[:n].cpu()
