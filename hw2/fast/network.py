"""The fast U-Net: unet.Unet with hw2/fast/layers.py's equivalents swapped in, and a forward
that adds the lever that spans the whole network (the channels-last rule). speed_up() makes
a unet.Unet fast in place and plain() undoes it; parameters, their names and the state_dict
stay the homework's, so checkpoints are the same either way.
"""
import torch

import unet
from hw2.fast import layers, replay
from hw2.fast.state import sampling_now

CPU_CHANNELS_LAST_PIXELS = 32 * 32  # on a CPU, sampling stores feature maps this large channels-last

# lever -> (the homework's class, its fast equivalent) for the levers that are a class swap
SWAPS = {
    "fused_norms": [(unet.WeightStandardizedConv2d, layers.WeightStandardizedConv2d),
                    (unet.LayerNorm, layers.LayerNorm)],
    "folded_attention": [(unet.LinearAttention, layers.FoldedLinearAttention), (unet.Residual, layers.Residual)],
    "modulation_in_norm": [(unet.Block, layers.Block)],
}
NETWORK_LEVERS = ("fused_norms", "folded_attention", "base2_softmax", "attention_kernel", "modulation_in_norm",
                  "sub_pixel_upsample", "channels_last", "captured_sampling")
RUN_LEVERS = ("pass_size", "fused_adam")  # read off the model by hw2.fast's entry points
LEVERS = NETWORK_LEVERS + RUN_LEVERS


def sampled_channels_last(device, pixels):
    """The default rule: while sampling on a CPU, maps of CPU_CHANNELS_LAST_PIXELS pixels or more
    are stored channels-last (NHWC), where oneDNN runs their 16-32 channel convolutions
    faster. (In training, and on smaller maps, channels-last costs more than it saves: its
    GroupNorm and the backward pass are slower so.)"""
    return torch.device(device).type == "cpu" and pixels >= CPU_CHANNELS_LAST_PIXELS


class FastUnet(unet.Unet):
    """unet.Unet.forward, step for step, with the channels_last lever: every feature map stored
    channels-last (True), none (False), or by the default rule, sampled_channels_last (None).
    The layout changes speed, never the function. `levers` is the set hw2.fast.speed_up was
    given."""

    levers = frozenset()
    channels_last = None

    def layout(self, x):
        """The memory format for feature map x (B, C, H, W)."""
        if "channels_last" not in self.levers:
            return torch.contiguous_format
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = sampling_now() and sampled_channels_last(x.device, x.shape[-2] * x.shape[-1])
        return torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x, time):
        """x: (B, C, H, W), time: (B,) long -> predicted noise (B, out_dim, H, W). While sampling on
        CUDA, with captured_sampling, replayed from a CUDA graph per pass shape (hw2/fast/replay.py)."""
        if "captured_sampling" in self.levers and x.is_cuda and sampling_now():
            return replay.replayed(self, self.evaluate, x, time)
        return self.evaluate(x, time)

    def evaluate(self, x, time):
        """The network itself: unet.Unet.forward, step for step, with the channels-last rule."""
        x = self.init_conv(x.contiguous(memory_format=self.layout(x)))
        r = x

        t = self.time_mlp(time)  # (B, 4 dim)

        h = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            h.append(x)
            x = attn(block2(x, t))
            h.append(x)
            x = downsample(x)
            x = x.contiguous(memory_format=self.layout(x))

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)

        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, h.pop()), dim=1), t)
            x = attn(block2(torch.cat((x, h.pop()), dim=1), t))
            # stored, before it is upsampled, as the map it will be concatenated with
            x = upsample(x.contiguous(memory_format=layers.stored_as(h[-1] if h else r)))

        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)


def swap(module, cls):
    """Give module the class cls, a subclass or base of its own with the same parameters."""
    module.__class__ = cls


def speed_up(model, levers=LEVERS, channels_last=None):
    """Make the unet.Unet `model` fast in place with the levers named in `levers`; the same
    parameters and state_dict. channels_last: True (every map), False (none) or None (the
    default rule, sampled_channels_last)."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers: {', '.join(sorted(unknown))}")
    plain(model)
    for lever, pairs in SWAPS.items():
        if lever in levers:
            for module in model.modules():
                for homework, fast in pairs:
                    if type(module) is homework:
                        swap(module, fast)
    for module in model.modules():
        if isinstance(module, layers.FoldedLinearAttention):
            module.base2 = "base2_softmax" in levers
        if "attention_kernel" in levers and type(module) is unet.PreNorm and isinstance(module.fn, unet.LinearAttention):
            swap(module, layers.KernelPreNorm)
        if "sub_pixel_upsample" in levers and layers.is_upsample(module):
            swap(module, layers.SubPixelUpsample)
    swap(model, FastUnet)
    model.levers = frozenset(levers)
    model.channels_last = channels_last
    return model


def plain(model):
    """Undo speed_up: every module back to its homework class (a no-op on a plain model)."""
    homework_classes = {cls for cls in vars(unet).values() if isinstance(cls, type)}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in homework_classes or cls is torch.nn.Sequential:
                if type(module) is not cls:
                    for name in ("base2", "levers", "channels_last", "rows"):  # what speed_up and the layers set
                        module.__dict__.pop(name, None)
                    swap(module, cls)
                break
    return model


def is_fast(model):
    return isinstance(model, FastUnet)
