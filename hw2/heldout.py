"""The held-out denoising loss (--heldout_images): a quality figure that needs no Inception."""
import torch

from hw2.data import Batches, center_crops
from hw2.precision import autocast


@torch.inference_mode()
def heldout_loss(sampler, images, image_size, batch_size, seed, amp_dtype=None):
    """Mean L1 noise-prediction error of sampler's network on held-out images ((N, 3, R, R)
    uint8, center-cropped to image_size, no augmentation), over t uniform. t and the noise
    come from a fixed seed, so milestones (and runs) are comparable."""
    sampler.model.eval()
    device = sampler.device
    generator = torch.Generator(device=device).manual_seed(seed)
    images = center_crops(images, image_size)
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        x_0 = Batches.to_model(images[start:start + batch_size], device)
        t = torch.randint(0, sampler.num_timesteps, (x_0.shape[0],), device=device, generator=generator)
        noise = torch.randn(x_0.shape, device=device, generator=generator)
        with autocast(device, amp_dtype):
            total += sampler.p_loss(x_0, t, noise).item() * x_0.shape[0]
    return total / images.shape[0]
