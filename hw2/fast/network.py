"""The fast U-Net: unet.Unet with hw2/fast/layers.py's equivalents swapped in, and a forward
that adds the two levers that span the whole network (the joint time MLP, the channels-last
rule). speed_up() makes a unet.Unet fast in place and plain() undoes it; parameters, their
names and the state_dict stay the homework's, so checkpoints are the same either way.
"""
import torch
import torch.nn.functional as F

import unet
from hw2.fast import layers
from hw2.fast.state import sampling_now

CPU_CHANNELS_LAST_PIXELS = 32 * 32  # on a CPU, sampling stores feature maps this large channels-last

# lever -> (the homework's class, its fast equivalent) for the levers that are a class swap
SWAPS = {
    "fused_norms": [(unet.WeightStandardizedConv2d, layers.WeightStandardizedConv2d),
                    (unet.LayerNorm, layers.LayerNorm)],
    "folded_attention": [(unet.LinearAttention, layers.FoldedLinearAttention), (unet.Residual, layers.Residual)],
    "modulation_in_norm": [(unet.Block, layers.Block)],
}
NETWORK_LEVERS = ("fused_norms", "fixed_weights", "folded_attention", "base2_softmax", "attention_kernel",
                  "modulation_in_norm", "joint_time_mlp", "sub_pixel_upsample", "channels_last")
RUN_LEVERS = ("pass_size", "fused_adam")  # read off the model by hw2.fast's entry points


def sampled_channels_last(device, pixels):
    """The default rule: while sampling on a CPU, maps of CPU_CHANNELS_LAST_PIXELS pixels or more
    are stored channels-last (NHWC), where their 16-32 channel convolutions run faster so."""
    return torch.device(device).type == "cpu" and pixels >= CPU_CHANNELS_LAST_PIXELS


class FastUnet(unet.Unet):
    """unet.Unet.forward, step for step, with two levers:
    - joint_time_mlp: the ResNet blocks' small time MLPs (SiLU, Linear) as one matmul, their
      weights gathered at every call (with fixed_weights, once per reverse chain while sampling);
    - channels_last: every feature map stored channels-last (True), none (False), or by the
      default rule, sampled_channels_last (None). The layout changes speed, never the function.
    `levers` is the set hw2.fast.speed_up was given."""

    levers = frozenset()
    channels_last = None

    def resnets(self):
        return [m for m in self.modules() if isinstance(m, unet.ResnetBlock)]

    def time_weights(self):
        """The ResNet blocks' time-MLP weights, gathered: weight (2 * sum C, time_dim) with every
        block's scale rows first, then every block's shift rows; bias (2 * sum C,)."""
        linears = [block.mlp[1] for block in self.resnets()]
        weight = torch.cat([lin.weight.view(2, lin.out_features // 2, -1) for lin in linears], dim=1).flatten(0, 1)
        bias = torch.cat([lin.bias.view(2, -1) for lin in linears], dim=1).flatten()
        return weight, bias

    def scale_shifts(self, t):
        """t (B, time_dim) -> {ResNet block: (scale, shift)}, (B, C, 1, 1) each: what each
        block's own mlp computes from t, for all blocks in one matmul."""
        keep = "fixed_weights" in self.levers and sampling_now()
        fixed = self.__dict__.get("fixed_time") if keep else None
        if fixed is None:
            fixed = self.time_weights()
            if keep:
                self.__dict__["fixed_time"] = fixed
        scale, shift = F.linear(F.silu(t), *fixed).chunk(2, dim=1)  # (B, sum C) each
        blocks = self.resnets()
        sizes = [block.mlp[1].out_features // 2 for block in blocks]
        return {block: (s[:, :, None, None], h[:, :, None, None])
                for block, s, h in zip(blocks, scale.split(sizes, dim=1), shift.split(sizes, dim=1))}

    def end_sampling(self):
        self.__dict__.pop("fixed_time", None)

    def layout(self, x):
        """The memory format for feature map x (B, C, H, W)."""
        if "channels_last" not in self.levers:
            return torch.contiguous_format
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = sampling_now() and sampled_channels_last(x.device, x.shape[-2] * x.shape[-1])
        return torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x, time):
        """x: (B, C, H, W), time: (B,) long -> predicted noise (B, out_dim, H, W)."""
        x = self.init_conv(x.contiguous(memory_format=self.layout(x)))
        r = x

        t = self.time_mlp(time)  # (B, 4 dim)
        if "joint_time_mlp" in self.levers:
            per_block = self.scale_shifts(t)

            def run(block, x):
                return block(x, per_block[block])  # layers' ResnetBlock takes the pair
        else:
            def run(block, x):
                return block(x, t)

        h = []
        for block1, block2, attn, downsample in self.downs:
            x = run(block1, x)
            h.append(x)
            x = attn(run(block2, x))
            h.append(x)
            x = downsample(x)
            x = x.contiguous(memory_format=self.layout(x))

        x = run(self.mid_block2, self.mid_attn(run(self.mid_block1, x)))

        for block1, block2, attn, upsample in self.ups:
            x = run(block1, torch.cat((x, h.pop()), dim=1))
            x = attn(run(block2, torch.cat((x, h.pop()), dim=1)))
            # stored, before it is upsampled, as the map it will be concatenated with
            x = upsample(x.contiguous(memory_format=layers.stored_as(h[-1] if h else r)))

        x = run(self.final_res_block, torch.cat((x, r), dim=1))
        return self.final_conv(x)


class ResnetBlock(unet.ResnetBlock):
    """unet.ResnetBlock that also takes its time scale and shift precomputed (FastUnet's
    joint_time_mlp) in place of the time embedding."""

    def forward(self, x, time_emb=None):
        if not isinstance(time_emb, tuple):
            return super().forward(x, time_emb)
        h = self.block1(x, scale_shift=time_emb)
        h = self.block2(h)
        return h + self.res_conv(x)


def swap(module, cls):
    """Give module the class cls, a subclass or base of its own with the same parameters."""
    module.__class__ = cls


def speed_up(model, levers, channels_last=None):
    """Make the unet.Unet `model` fast in place with the levers named in `levers`; the same
    parameters and state_dict. channels_last: True, False or None (the default rule)."""
    unknown = set(levers) - set(NETWORK_LEVERS) - set(RUN_LEVERS)
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
        if isinstance(module, layers.WeightStandardizedConv2d):
            module.keep_fixed = "fixed_weights" in levers
        if "attention_kernel" in levers and type(module) is unet.PreNorm and isinstance(module.fn, unet.LinearAttention):
            swap(module, layers.KernelPreNorm)
        if "sub_pixel_upsample" in levers and layers.is_upsample(module):
            swap(module, layers.SubPixelUpsample)
        if "joint_time_mlp" in levers and type(module) is unet.ResnetBlock:
            swap(module, ResnetBlock)
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
                    for name in ("base2", "keep_fixed", "fixed", "fixed_time"):
                        module.__dict__.pop(name, None)
                    module.__dict__.pop("levers", None)
                    module.__dict__.pop("channels_last", None)
                    swap(module, cls)
                break
    return model


def is_fast(model):
    return isinstance(model, FastUnet)
