"""An exponential moving average of the U-Net's weights (Polyak averaging), for sampling.

After each optimizer step: theta_ema <- decay * theta_ema + (1 - decay) * theta. Only the
U-Net's parameters are averaged; the diffusion schedule is not a weight and is rebuilt
from the config, never averaged.
"""
import copy

import torch


class EMA:
    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        """One step of the average, every parameter in one update (a few kernels, not one each)."""
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()],
                             1.0 - self.decay)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
