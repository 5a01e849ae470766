"""Drawing images from a trained model, for milestones and for --sample."""
import math

import torch
from tqdm.auto import tqdm

from hw2 import fast
from hw2.distributed import Processes
from hw2.precision import autocast


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
    per_pass = fast.images_per_pass(sampler.model, device, sampler.image_size, amp_dtype)
    chunks = range(0, share, per_pass)
    steps = min(sampler.sampling_timesteps, sampler.num_timesteps)
    with tqdm(total=len(chunks) * steps, desc=f"sampling {n} images", unit="step", leave=False,
              disable=not (progress and procs.main)) as bar, fast.sampling(sampler.model), autocast(device, amp_dtype):
        images = [sampler.sample(min(per_pass, share - start), generator=generator, progress=bar).float()
                  for start in chunks]
    return procs.gather(torch.cat(images))[:n].cpu()
