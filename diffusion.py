"""DDPM (Ho et al. 2020) with the cosine schedule of Nichol & Dhariwal (2021).

Conventions, held throughout the project:
- x_0, x_t: (B, C, H, W) images in [-1, 1] (the model's scale); `sample` and
  `p_sample_loop` return [0, 1], the only place that converts back.
- t: a (B,) long tensor of 0-based step indices, 0 <= t < T. Index t holds the
  paper's step t + 1, so alpha_bar[t] = prod_{s <= t} alpha[s] and index 0 is
  the last, noise-free step of sampling.
- Equation numbers refer to the homework write-up; where it has typos the code
  follows the paper and says so.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def extract(a, t, x_shape):
    """Gather a[t] for a (B,) index tensor and shape it (B, 1, 1, ...) to broadcast over x."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def cosine_schedule(timesteps, s=0.008):
    """alpha_t for t = 1..T as a float64 tensor of length T (Nichol & Dhariwal eq. 17).

    alpha_bar(t) = f(t) / f(0), f(t) = cos(((t / T + s) / (1 + s)) * pi / 2)^2,
    alpha_t = clip(alpha_bar(t) / alpha_bar(t - 1), 0.001, 1).
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    alphas = alpha_bar[1:] / alpha_bar[:-1]
    return alphas.clamp(0.001, 1.0)


class Diffusion(nn.Module):
    def __init__(self, model, *, image_size, channels=3, timesteps=1000, sampling_timesteps=None):
        """sampling_timesteps: None (or T) samples with the full DDPM chain, as the homework;
        fewer uses DDIM (Song et al. 2021, eta = 0) over that many evenly spaced steps."""
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.channels = channels
        self.num_timesteps = timesteps
        self.sampling_timesteps = sampling_timesteps or timesteps
        if not 1 <= self.sampling_timesteps <= timesteps:
            raise ValueError(f"sampling_timesteps must be between 1 and T = {timesteps}, got {sampling_timesteps}")

        # Computed in float64, stored once as float32 buffers so .to(device) moves them.
        alphas = cosine_schedule(timesteps)
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
        betas = 1.0 - alphas

        def buffer(name, value):
            self.register_buffer(name, value.to(torch.float32))

        buffer("alphas", alphas)
        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)

        # q(x_t | x_0), eq. 15 with the bar the write-up drops
        buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())

        # x_0 from x_t and eps: x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
        buffer("sqrt_recip_alphas_cumprod", alphas_cumprod.rsqrt())
        buffer("sqrt_recipm1_alphas_cumprod", (1.0 / alphas_cumprod - 1.0).sqrt())

        # posterior q(x_{t-1} | x_t, x_0), eq. 18 with the square roots where Ho et al. put them
        buffer("posterior_mean_coef1", alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_variance", betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))

    @property
    def device(self):
        return self.betas.device

    def with_model(self, model):
        """The same diffusion around another network (e.g. an EMA of the weights), on this device."""
        return Diffusion(model, image_size=self.image_size, channels=self.channels, timesteps=self.num_timesteps,
                         sampling_timesteps=self.sampling_timesteps).to(self.device)

    # forward process q(x_t | x_0)

    def q_sample(self, x_0, t, noise=None):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_0)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise
        )

    # training objective

    def p_loss(self, x_0, t, noise=None):
        """Mean L1 distance between the true noise and the model's prediction of it."""
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = self.q_sample(x_0, t, noise)
        predicted = self.model(x_t, t)
        return F.l1_loss(predicted.float(), noise.float())

    def forward(self, x_0, noise=None, t=None):
        """x_0: (B, C, H, W) in [-1, 1] -> the scalar loss at t ~ U{0, ..., T-1}
        (t and noise are drawn here unless given)."""
        b, c, h, w = x_0.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"expected images of shape {(self.channels, self.image_size, self.image_size)}, got {(c, h, w)}")
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device, dtype=torch.long)
        return self.p_loss(x_0, t, noise)

    # reverse process p(x_{t-1} | x_t), Algorithm 2

    def predict_start_from_noise(self, x_t, t, noise):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_noise_from_start(self, x_t, t, x_0):
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x_0) / extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def model_predictions(self, x_t, t):
        """(x0_hat, eps_hat) from the model at x_t: x0_hat clamped to [-1, 1], and the noise
        that the clamped x0_hat implies. Both samplers step from these."""
        eps = self.model(x_t, t).float()
        x_0 = self.predict_start_from_noise(x_t, t, eps).clamp(-1.0, 1.0)
        return x_0, self.predict_noise_from_start(x_t, t, x_0)

    def q_posterior(self, x_0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            extract(self.posterior_mean_coef1, t, x_t.shape) * x_0
            + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        return mean, extract(self.posterior_variance, t, x_t.shape)

    @torch.inference_mode()
    def p_sample(self, x, t, t_index, generator=None):
        """One reverse step x_t -> x_{t-1}; t: (B,) long, t_index: the same step as an int.

        x0_hat is clamped to [-1, 1] before it enters the posterior mean; the step
        at t_index 0 adds no noise.
        """
        x_0, _ = self.model_predictions(x, t)
        mean, variance = self.q_posterior(x_0, x, t)
        if t_index == 0:
            return mean
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        return mean + variance.sqrt() * noise

    @torch.inference_mode()
    def p_sample_loop(self, img, generator=None, progress=None):
        """Run the whole reverse chain from the noise image img (B, C, H, W); returns [0, 1].
        progress: anything with update() (a tqdm bar), told after each step."""
        b = img.shape[0]
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((b,), i, device=img.device, dtype=torch.long)
            img = self.p_sample(img, t, i, generator=generator)
            if progress is not None:
                progress.update()
        return unnormalize(img)

    # DDIM (Song et al. 2021): a shorter, deterministic (eta = 0) reverse chain

    @torch.inference_mode()
    def ddim_sample_loop(self, img, steps, eta=0.0, generator=None, progress=None):
        """The reverse chain over `steps` evenly spaced t from T-1 to 0; returns [0, 1].
        With steps = T and eta = 1 it is exactly the DDPM chain of p_sample_loop."""
        b = img.shape[0]
        times = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        for i, i_prev in zip(times, times[1:] + [-1]):
            t = torch.full((b,), i, device=img.device, dtype=torch.long)
            x_0, eps = self.model_predictions(img, t)
            if progress is not None:
                progress.update()
            if i_prev < 0:
                img = x_0
                continue
            abar = self.alphas_cumprod[i]
            abar_prev = self.alphas_cumprod[i_prev]
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
            img = abar_prev.sqrt() * x_0 + (1 - abar_prev - sigma**2).sqrt() * eps
            if eta > 0:
                img = img + sigma * torch.randn(img.shape, device=img.device, dtype=img.dtype, generator=generator)
        return unnormalize(img)

    @torch.inference_mode()
    def sample(self, batch_size=16, generator=None, progress=None):
        """Draw batch_size images, (B, C, H, W) in [0, 1]."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        img = torch.randn(shape, device=self.device, generator=generator)
        if self.sampling_timesteps < self.num_timesteps:
            return self.ddim_sample_loop(img, self.sampling_timesteps, generator=generator, progress=progress)
        return self.p_sample_loop(img, generator=generator, progress=progress)


def normalize(x):
    """[0, 1] -> [-1, 1]: images enter the model here."""
    return x * 2.0 - 1.0


def unnormalize(x):
    """[-1, 1] -> [0, 1]: images leave the model here."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)
