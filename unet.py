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

from hw2 import kernels


CPU_CHANNELS_LAST_PIXELS = 32 * 32  # on a CPU, feature maps this large are stored channels-last
LOG2_E = 1.4426950408889634  # e^z = 2^(z log2 e)
EXP2_LIMIT = 64.0  # |z| <= 64: 2^z, and sums of millions of them, stay far inside float32's range


def sampled_channels_last(device, pixels):
    """Whether, by default, a feature map of `pixels` pixels is stored channels-last while
    sampling (no gradient) on `device` (see Unet)."""
    return torch.device(device).type == "cpu" and pixels >= CPU_CHANNELS_LAST_PIXELS


def sampled_base2(device, dtype):
    """Whether sampling (no gradient) on `device` in `dtype` takes the folded linear attention's
    softmaxes in base 2, as far as its bound allows (LinearAttention.base2)."""
    return torch.device(device).type == "cpu" and dtype == torch.float32


def stored_as(x):
    """x's memory format: torch.channels_last if x is stored so, else torch.contiguous_format."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


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
    """conv -> GroupNorm -> SiLU; in a ResNet block's first Block the GroupNorm's affine is
    the time-modulated one of ResnetBlock.modulation."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, modulation=None):
        x = self.proj(x)
        if modulation is None:
            return self.act(self.norm(x))
        gain, offset = modulation  # (B, C) each
        groups, eps = self.norm.num_groups, self.norm.eps
        if x.is_contiguous():
            # the B images as one image of B*C channels in B*groups groups: the same groups,
            # and GroupNorm's own affine becomes the per-image one (one pass over x, not two)
            b, c, h, w = x.shape
            y = F.group_norm(x.view(1, b * c, h, w), b * groups, gain.flatten(), offset.flatten(), eps)
            return self.act(y.view(b, c, h, w))
        # channels-last: a multiply-add in x's precision (bf16 stays bf16 for the SiLU and next conv)
        gain, offset = (z.to(x.dtype)[:, :, None, None] for z in modulation)
        return self.act(torch.addcmul(offset, F.group_norm(x, groups, eps=eps), gain))


class ResnetBlock(nn.Module):
    """Two Blocks with a residual connection; the time embedding modulates the first."""

    def __init__(self, dim, dim_out, *, time_emb_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def modulation(self, time_emb):
        """time_emb (B, time_emb_dim) -> (gain, offset), (B, dim_out) each: block1's GroupNorm
        affine (g, b) and the time scale/shift as one affine,
        (n g + b)(scale + 1) + shift = n [g (scale + 1)] + [b (scale + 1) + shift].
        Unet.time_modulations computes the same for all blocks at once."""
        scale, shift = self.mlp(time_emb).chunk(2, dim=1)
        norm = self.block1.norm
        return norm.weight * (scale + 1), torch.addcmul(shift, norm.bias, scale + 1)

    def forward(self, x, modulation):
        """x (B, dim, H, W), modulation: from modulation() -> (B, dim_out, H, W)."""
        h = self.block1(x, modulation)
        h = self.block2(h)
        return h + self.res_conv(x)


class LayerNorm(nn.Module):
    """Layer norm over the channels of each pixel: (x - mean_C) / sqrt(var_C + eps) * g,
    with one gain per channel and no bias (the homework's norm around attention).

    Computed by F.layer_norm on a channels-last view: the same function as the starter's
    mean/var arithmetic, in one fused kernel instead of six passes (3x faster on a CPU). The
    result is stored as x is (channels-last or not)."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    @staticmethod
    def eps_for(dtype):
        """The homework's eps: 1e-5 on float32 maps, 1e-3 on lower-precision ones."""
        return 1e-5 if dtype == torch.float32 else 1e-3

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.g.view(-1), None,
                         self.eps_for(x.dtype))  # (B, H, W, C)
        return y.permute(0, 3, 1, 2).contiguous(memory_format=stored_as(x))  # (B, C, H, W)


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
        if kernels.takes(x, self):
            return self.compiled(x)
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
        is 2-4x faster than the direct form (benchmarks/README.md). Where base2() allows,
        the softmaxes are taken in base 2 without their max-subtraction. (While sampling on
        a CPU, compiled() computes the same in one pass, where its kernel is built.)"""
        b, c, h, w = x.shape
        n, heads, d = h * w, self.heads, self.dim_head
        hidden = heads * d
        w_q, w_k, w_v = self.to_qkv.weight.view(3, hidden, c)
        x_t = x.flatten(2).transpose(1, 2) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(b, n, c)
        x = x_t.transpose(1, 2)  # x_t (B, N, C) and x (B, C, N): views, however x is stored
        if self.base2(x_t):
            # softmax(z) = 2^z' / sum 2^z' with z' = z log2 e (log2 e folded into the weights),
            # in place; k's sums divide kx, 32x smaller than k
            q = torch.bmm(x_t, (w_q * LOG2_E).t().expand(b, -1, -1)).exp2_().view(b, n, heads, d)
            q = q.div_(q.sum(dim=-1, keepdim=True))  # (B, N, heads, d)
            k = torch.bmm((w_k * LOG2_E).expand(b, -1, -1), x).exp2_()  # (B, hidden, N), unnormalized
            kx = torch.bmm(k, x_t).div_(k.sum(dim=-1, keepdim=True))  # (B, hidden, C)
        else:
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

    def compiled(self, x, norm=None):
        """forward(norm(x)) in one pass per image, in hw2/csrc/linear_attention.c: folded() and
        the LayerNorm after it, with `norm` (PreNorm's LayerNorm) before it when given. In
        float32, also under bfloat16 autocast: there the result is rounded to bfloat16 once,
        at the end (the norms take bfloat16's eps, as they would on bfloat16 maps)."""
        b, c, h, w = x.shape
        n, hidden = h * w, self.heads * self.dim_head
        w_q, w_k, w_v = self.to_qkv.weight.view(3, hidden, c)
        conv, after = self.to_out
        x_t = x.flatten(2).transpose(1, 2) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(b, n, c)
        out = kernels.linear_attention(x_t, None if norm is None else norm.g.view(-1), w_q * LOG2_E, w_k * LOG2_E, w_v,
                                       conv.weight.view(c, hidden) * (self.scale / n), conv.bias, after.g.view(-1),
                                       LayerNorm.eps_for(x.dtype))  # (B, N, C)
        return out.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), stored pixel-major

    def base2(self, x_t):
        """Whether folded() may take its softmaxes as 2^z' / sum 2^z' (z' = z log2 e) with no
        max subtracted: in float32 on a CPU without gradient (sampling), where torch's exp2 runs
        3x faster than its exp and the max would cost a pass over q and k. (In bfloat16 the
        conversions to float32 it needs cost what it saves; GPUs keep torch's fused softmax.)
        Safe when every exponent is within EXP2_LIMIT, which |w . x| <= |w| |x| bounds for each
        row w of W_q and W_k and each pixel x: weights or inputs too large for it, or a NaN, take
        the usual way."""
        if torch.is_grad_enabled() or not sampled_base2(x_t.device, x_t.dtype):
            return False
        w = self.to_qkv.weight[: 2 * self.heads * self.dim_head].flatten(1)  # the rows of W_q and W_k
        bound = LOG2_E * w.norm(dim=1).amax() * x_t.square().sum(dim=-1).amax().sqrt()
        return bound.item() <= EXP2_LIMIT


class PreNorm(nn.Module):
    """fn(LayerNorm(x))."""

    def __init__(self, dim, fn):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.fn = fn

    def forward(self, x):
        if isinstance(self.fn, LinearAttention) and kernels.takes(x, self.fn):
            return self.fn.compiled(x, self.norm)  # both norms inside the kernel's pass
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


class Upsample(nn.Sequential):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (the homework's layer; the conv is [1]).

    Computed without forming the upsampled map (a sub-pixel convolution, Shi et al. 2016):
    an output pixel of row parity a sees, through the 3x3 kernel, only two input rows, i-1
    and i (a = 0) or i and i+1 (a = 1), with the kernel's rows summed onto them as ROWS[a]
    says; the same for columns. So one 2x2 conv with 4x the output channels, one per
    (row, column) parity, then a pixel shuffle, gives the same output with 4 instead of 9
    multiply-adds per output pixel and channel pair."""

    # ROWS[a][r, k]: kernel row k of the 3x3 conv falls on input row r of the 2x2 window
    # (i-1, i for a = 0; i, i+1 for a = 1)
    ROWS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])

    def __init__(self, dim, dim_out):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim_out, 3, padding=1))
        # in pixel-shuffle order (parity 1 first), on the model's device; not saved
        self.register_buffer("rows", self.ROWS.flip(0), persistent=False)

    def forward(self, x):
        conv = self[1]
        w = conv.weight  # (O, I, 3, 3)
        # The 2x2 window at padded position p covers input rows p-1 and p; parity a's window
        # for output row 2i + a starts at p = i + a, so in pixel-shuffle order (parity 1 - a
        # first) output row 2i + a is shuffled row 2i + a + 1: crop one row and column each side.
        rows = self.rows.to(w.dtype)
        kernel = torch.einsum("ark,oikl,bcl->oabirc", rows, w, rows).reshape(-1, w.shape[1], 2, 2)
        y = F.conv2d(x, kernel, conv.bias.repeat_interleave(4), padding=1)  # (B, 4 O, H + 1, W + 1)
        return F.pixel_shuffle(y, 2)[:, :, 1:-1, 1:-1]  # (B, O, 2 H, 2 W)


class Unet(nn.Module):
    """channels_last: None (the default) stores the feature maps of at least
    CPU_CHANNELS_LAST_PIXELS pixels channels-last (NHWC) on a CPU, where their 16-32 channel
    convolutions run 1.3-3.4x faster so, and every other map as usual (NCHW); True stores
    every map channels-last, on any device (--channels_last); False none. The layout changes
    speed only, never the function."""

    def __init__(self, dim, init_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3, resnet_block_groups=8,
                 channels_last=None):
        super().__init__()
        self.channels_last = channels_last
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
        self.resnets = tuple(m for m in self.modules() if isinstance(m, ResnetBlock))  # not registered twice
        self.fixed_time = None  # the ResNet blocks' time-MLP weights, gathered, while fixed_weights() is active

    @contextlib.contextmanager
    def fixed_weights(self):
        """For inference while the weights stay as they are (sampling's T forward passes):
        every weight-standardized kernel is standardized once, not at every pass."""
        convs = [m for m in self.modules() if isinstance(m, WeightStandardizedConv2d)]
        for conv in convs:
            conv.fixed = {}
        self.fixed_time = self.time_weights()
        try:
            yield self
        finally:
            for conv in convs:
                conv.fixed = None
            self.fixed_time = None

    def time_weights(self):
        """The ResNet blocks' time-MLP weights and first GroupNorms' affines, gathered: weight
        (2 * sum C, time_dim) with every block's scale rows first, then every block's shift
        rows; bias (2 * sum C,); gain and offset (sum C,)."""
        linears = [block.mlp[1] for block in self.resnets]
        norms = [block.block1.norm for block in self.resnets]
        weight = torch.cat([lin.weight.view(2, lin.out_features // 2, -1) for lin in linears], dim=1).flatten(0, 1)
        bias = torch.cat([lin.bias.view(2, -1) for lin in linears], dim=1).flatten()
        return weight, bias, torch.cat([n.weight for n in norms]), torch.cat([n.bias for n in norms])

    def time_modulations(self, time):
        """time (B,) long -> {ResNet block: (gain, offset)}, what each block's own
        ResnetBlock.modulation computes, with the blocks' 19 small time MLPs as one matmul."""
        weight, bias, g, b = self.fixed_time or self.time_weights()
        scale, shift = F.linear(F.silu(self.time_mlp(time)), weight, bias).chunk(2, dim=1)  # (B, sum C) each
        gain, offset = g * (scale + 1), torch.addcmul(shift, b, scale + 1)
        sizes = [block.block1.norm.num_channels for block in self.resnets]
        return dict(zip(self.resnets, zip(gain.split(sizes, dim=1), offset.split(sizes, dim=1))))

    def layout(self, x):
        """The memory format for feature map x (B, C, H, W), by the rule in the class docstring."""
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = not torch.is_grad_enabled() and sampled_channels_last(x.device, x.shape[-2] * x.shape[-1])
        return torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x, time):
        """x: (B, C, H, W), time: (B,) long -> predicted noise (B, out_dim, H, W)."""
        x = self.init_conv(x.contiguous(memory_format=self.layout(x)))
        r = x
        t = self.time_modulations(time)  # {ResNet block: its time modulation}

        skips = []
        for block1, block2, attn, downsample in self.downs:
            x = block1(x, t[block1])
            skips.append(x)
            x = attn(block2(x, t[block2]))
            skips.append(x)
            x = downsample(x)
            x = x.contiguous(memory_format=self.layout(x))

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t[self.mid_block1])), t[self.mid_block2])

        for block1, block2, attn, upsample in self.ups:
            x = block1(torch.cat((x, skips.pop()), dim=1), t[block1])
            x = attn(block2(torch.cat((x, skips.pop()), dim=1), t[block2]))
            # stored, before it is upsampled, as the map it will be concatenated with
            x = upsample(x.contiguous(memory_format=stored_as(skips[-1] if skips else r)))

        x = self.final_res_block(torch.cat((x, r), dim=1), t[self.final_res_block])
        return self.final_conv(x)
