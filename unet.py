"""The homework's time-conditioned U-Net, which predicts the noise eps in x_t.

Shapes: x is (B, C, H, W) in [-1, 1]-ish scale, time is a (B,) long tensor of
0-based step indices; the output has the shape of x (out_dim channels).

This is the homework starter's network, the same function with the same parameter
names, so that the starter's checkpoints load here (tests/test_unet.py checks it against
numbers computed by the starter's own code).

Layout (dim=16, dim_mults=(1, 2, 4, 8): 2,465,827 parameters):
    7x7 input conv
    down, per level: ResNet block, ResNet block, linear attention, downsample
        (a stride-2 4x4 conv; the last level keeps its resolution)
    middle: ResNet block, full attention, ResNet block
    (every attention is wrapped as x + attn(LayerNorm(x)))
    up, per level: the mirror image, each ResNet block fed the matching skip,
        nearest-neighbour upsampling
    final ResNet block on [features, input-conv features], 1x1 conv out
"""
import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class SinusoidalTimeEmbedding(nn.Module):
    """t (B,) -> (B, dim): sin/cos features at geometric frequencies (Vaswani et al. 2017)."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs[None, :]  # (B, dim/2)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (B, dim)


class WeightStandardizedConv2d(nn.Conv2d):
    """A conv whose kernel is standardized per output channel; it works well
    with GroupNorm (Qiao et al. 2019, "Weight Standardization").

    Inside Unet.fixed_weights() the standardized kernel is computed once and reused, for
    the many forward passes of sampling, where the weights do not change."""

    fixed = None  # {eps: standardized kernel} while Unet.fixed_weights() is active

    def standardized(self, eps):
        """(w - mean) / sqrt(var + eps) over each output channel's kernel (biased variance):
        a layer norm without gain or bias, so F.layer_norm computes it in one fused pass."""
        w = self.weight
        return F.layer_norm(w.reshape(w.shape[0], -1), (w[0].numel(),), eps=eps).view_as(w)

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        if self.fixed is None:
            w = self.standardized(eps)
        elif eps in self.fixed:
            w = self.fixed[eps]
        else:
            w = self.fixed[eps] = self.standardized(eps)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Block(nn.Module):
    """conv -> GroupNorm -> optional time scale/shift -> SiLU."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.proj(x)
        if scale_shift is None:
            return self.act(self.norm(x))
        # GroupNorm's affine and the time modulation as one multiply-add per element:
        # (n g + b)(scale + 1) + shift = n [g (scale + 1)] + [b (scale + 1) + shift]
        scale, shift = scale_shift  # (B, C, 1, 1) each
        gain = self.norm.weight.view(1, -1, 1, 1) * (scale + 1)
        offset = torch.addcmul(shift, self.norm.bias.view(1, -1, 1, 1), scale + 1)
        x = F.group_norm(x, self.norm.num_groups, eps=self.norm.eps)
        return self.act(torch.addcmul(offset, x, gain))


class ResnetBlock(nn.Module):
    """Two Blocks with a residual connection; the time embedding modulates the first."""

    def __init__(self, dim, dim_out, *, time_emb_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, dim_out, 1, 1)
        h = self.block1(x, scale_shift=scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


class LayerNorm(nn.Module):
    """Layer norm over the channels of each pixel: (x - mean_C) / sqrt(var_C + eps) * g,
    with one gain per channel and no bias (the homework's norm around attention).

    Computed by F.layer_norm on a channels-last view: the same function as the starter's
    mean/var arithmetic, in one fused kernel instead of six passes (3x faster on a CPU)."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.g.view(-1), None, eps)  # (B, H, W, C)
        return y.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


class Attention(nn.Module):
    """Full multi-head self-attention over the H*W positions, with q and k L2-normalised
    across positions and a fixed similarity scale of 10 in place of dim_head^-0.5."""

    def __init__(self, dim, heads=4, dim_head=32, scale=10):
        super().__init__()
        self.heads = heads
        self.scale = scale
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        _, _, h, w = x.shape
        q, k, v = (
            rearrange(z, "b (h c) x y -> b h c (x y)", h=self.heads)  # (B, heads, dim_head, HW)
            for z in self.to_qkv(x).chunk(3, dim=1)
        )
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        q, k, v = (z.transpose(-2, -1) for z in (q, k, v))  # (B, heads, HW, dim_head)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = rearrange(out, "b h (x y) c -> b (h c) x y", x=h, y=w)
        return self.to_out(out)


class LinearAttention(nn.Module):
    """Attention linear in H*W (Shen et al. 2018): softmax over features for q (then scaled
    by dim_head^-0.5), over positions for k, v divided by H*W, and k v^T computed first:
    out = to_out(context^T q), context = k v^T per head."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), LayerNorm(dim))

    def forward(self, x):
        _, c, h, w = x.shape
        out = self.folded(x) if h * w > c else self.direct(x)
        return self.to_out[1](out)

    def direct(self, x):
        """The computation as written: q, k, v from one 1x1 conv, then the output conv."""
        _, _, h, w = x.shape
        q, k, v = (
            rearrange(z, "b (h c) x y -> b h c (x y)", h=self.heads)  # (B, heads, dim_head, HW)
            for z in self.to_qkv(x).chunk(3, dim=1)
        )
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        v = v / (h * w)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # (B, heads, dim_head, dim_head)
        out = torch.einsum("bhde,bhdn->bhen", context, q)  # (B, heads, dim_head, HW)
        out = rearrange(out, "b h c (x y) -> b (h c) x y", x=h, y=w)
        return self.to_out[0](out)

    def folded(self, x):
        """The same function, reassociated for many positions and few channels (the top
        levels): v = W_v x is never formed, since context = (k x^T) W_v^T / HW; the output
        conv and q's scale are folded into context before it meets q; and the result comes
        out pixel-major, as the LayerNorm after it wants. At 32 x 32 px with 16 channels it
        is 2-4x faster than the direct form (benchmarks/README.md)."""
        b, c, h, w = x.shape
        n, heads, d = h * w, self.heads, self.dim_head
        hidden = heads * d
        w_q, w_k, w_v = self.to_qkv.weight.view(3, hidden, c)
        x = x.flatten(2)  # (B, C, N)
        x_t = x.transpose(1, 2)  # (B, N, C)
        q = torch.bmm(x_t, w_q.t().expand(b, -1, -1)).view(b, n, heads, d).softmax(dim=-1)  # (B, N, heads, d)
        k = torch.bmm(w_k.expand(b, -1, -1), x).softmax(dim=-1)  # (B, hidden, N): straight into this layout
        kx = torch.bmm(k, x_t)  # (B, hidden, C)
        context = torch.matmul(kx.view(b, heads, d, c), w_v.view(heads, d, c).transpose(1, 2))  # (B, heads, d, e)
        conv = self.to_out[0]
        c_out = conv.out_channels
        w_out = conv.weight.view(c_out, heads, d) * (self.scale / n)  # (C_out, heads, e)
        m = torch.einsum("ohe,bhde->bhdo", w_out, context).reshape(b, hidden, c_out)
        out = torch.baddbmm(conv.bias.view(1, 1, c_out), q.view(b, n, hidden), m)  # (B, N, C_out)
        return out.view(b, h, w, c_out).permute(0, 3, 1, 2)  # (B, C_out, H, W), stored pixel-major


class PreNorm(nn.Module):
    """fn(LayerNorm(x))."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class Residual(nn.Module):
    """x + fn(x). With PreNorm, it wraps each attention layer (the homework's
    parameter names, so its checkpoints load)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


def Downsample(dim, dim_out):
    return nn.Conv2d(dim, dim_out, 4, stride=2, padding=1)


def Upsample(dim, dim_out):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))


class Unet(nn.Module):
    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3, resnet_block_groups=8):
        super().__init__()
        self.channels = channels
        self.dim = dim
        self.dim_mults = tuple(dim_mults)
        init_dim = init_dim or dim
        self.out_dim = out_dim or channels
        self.init_conv = nn.Conv2d(channels, init_dim, 7, padding=3)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalTimeEmbedding(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        def resnet(a, b):
            return ResnetBlock(a, b, time_emb_dim=time_dim, groups=resnet_block_groups)

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            is_last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                resnet(d_in, d_in),
                resnet(d_in, d_in),
                Residual(PreNorm(d_in, LinearAttention(d_in))),
                Downsample(d_in, d_out) if not is_last else nn.Conv2d(d_in, d_out, 3, padding=1),
            ]))

        mid_dim = dims[-1]
        self.mid_block1 = resnet(mid_dim, mid_dim)
        self.mid_attn = Residual(PreNorm(mid_dim, Attention(mid_dim)))
        self.mid_block2 = resnet(mid_dim, mid_dim)

        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            is_last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                resnet(d_out + d_in, d_out),
                resnet(d_out + d_in, d_out),
                Residual(PreNorm(d_out, LinearAttention(d_out))),
                Upsample(d_out, d_in) if not is_last else nn.Conv2d(d_out, d_in, 3, padding=1),
            ]))

        self.final_res_block = resnet(init_dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    @contextlib.contextmanager
    def fixed_weights(self):
        """For inference while the weights stay as they are (sampling's T forward passes):
        every weight-standardized kernel is standardized once, not at every pass."""
        convs = [m for m in self.modules() if isinstance(m, WeightStandardizedConv2d)]
        for conv in convs:
            conv.fixed = {}
        try:
            yield self
        finally:
            for conv in convs:
                conv.fixed = None

    def forward(self, x, time):
        """x: (B, C, H, W), time: (B,) long -> predicted noise (B, out_dim, H, W)."""
        x = self.init_conv(x)
        r = x
        t = self.time_mlp(time)  # (B, 4 * dim)

        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t)
            skips.append(x)
            x = attn(block2(x, t))
            skips.append(x)
            x = downsample(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)

        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t)
            x = attn(block2(torch.cat((x, skips.pop()), dim=1), t))
            x = upsample(x)

        x = self.final_res_block(torch.cat((x, r), dim=1), t)
        return self.final_conv(x)
