"""Fast equivalents of unet.py's layers: each a subclass of the homework's class with the same
parameters and state_dict keys and the same function, computed another way. hw2.fast.speed_up
swaps them into a unet.Unet; tests/test_fast.py holds each equal to its homework class.

While sampling (hw2.fast.sampling), some take shortcuts that only hold when nothing needs a
gradient and the weights stay as they are for a whole reverse chain.
"""
import torch
import torch.nn.functional as F
from torch import nn

import unet
from hw2.fast import cuda, kernel
from hw2.fast.state import sampling_now

LOG2_E = 1.4426950408889634  # e^z = 2^(z log2 e)
EXP2_LIMIT = 64.0  # |z| <= 64: 2^z, and sums of millions of them, stay far inside float32's range


def exp2_pays():
    """Whether torch's exp2 is cheaper than its exp on this CPU: with AVX-512 kernels it is (the
    base2_softmax lever's 2.9 % of the FID run), with AVX2 kernels it costs more than exp (7 %
    of that run lost: benchmarks/README.md). ATen's own choice of kernels is read, so
    ATEN_CPU_CAPABILITY is honoured."""
    get = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    return get().upper().startswith("AVX512")


def eps_for(dtype):
    """The homework's eps for its norms: 1e-5 on float32 maps, 1e-3 on lower-precision ones."""
    return 1e-5 if dtype == torch.float32 else 1e-3


def stored_as(x):
    """x's memory format: torch.channels_last if x is stored so, else torch.contiguous_format."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def pixel_major(x):
    """(B, C, H, W) -> a (B, H*W, C) view or copy, however x is stored."""
    b, c, h, w = x.shape
    return x.flatten(2).transpose(1, 2) if x.is_contiguous() else x.permute(0, 2, 3, 1).reshape(b, h * w, c)


class WeightStandardizedConv2d(unet.WeightStandardizedConv2d):
    """The standardization, (w - mean) / sqrt(var + eps) per output channel with the biased
    variance, is a layer norm without gain or bias over each output channel's kernel, so
    F.layer_norm computes it in one fused pass."""

    def forward(self, x):
        w = self.weight  # (O, I, k, k)
        w = F.layer_norm(w.reshape(w.shape[0], -1), (w[0].numel(),), eps=eps_for(x.dtype)).view_as(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerNorm(unet.LayerNorm):
    """The homework's per-pixel norm over the channels is F.layer_norm on a channels-last view:
    one fused kernel instead of the mean/var arithmetic's several passes. The result is stored
    as x is (channels-last or not)."""

    def forward(self, x):
        y = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.g.view(-1), None, eps_for(x.dtype))  # (B, H, W, C)
        return y.permute(0, 3, 1, 2).contiguous(memory_format=stored_as(x))  # (B, C, H, W)


class Block(unet.Block):
    """The time scale and shift merged into GroupNorm's own affine (g, b):
    (n g + b)(scale + 1) + shift = n [g (scale + 1)] + [b (scale + 1) + shift],
    so the normalized map is written once, not three times."""

    def forward(self, x, scale_shift=None):
        if scale_shift is None:
            return super().forward(x)
        x = self.proj(x)
        scale, shift = (z.flatten(1) for z in scale_shift)  # (B, C) each
        gain, offset = self.norm.weight * (scale + 1), torch.addcmul(shift, self.norm.bias, scale + 1)
        groups, eps = self.norm.num_groups, self.norm.eps
        if x.is_contiguous():
            # the B images as one image of B*C channels in B*groups groups: the same groups, and
            # GroupNorm's own affine becomes the per-image one
            b, c, h, w = x.shape
            y = F.group_norm(x.view(1, b * c, h, w), b * groups, gain.flatten(), offset.flatten(), eps)
            return self.act(y.view(b, c, h, w))
        # channels-last: a multiply-add in x's precision (bf16 stays bf16 for the SiLU and next conv)
        gain, offset = (z.to(x.dtype)[:, :, None, None] for z in (gain, offset))
        return self.act(torch.addcmul(offset, F.group_norm(x, groups, eps=eps), gain))


class FoldedLinearAttention(unet.LinearAttention):
    """The same function, reassociated for many positions and few channels (the top levels,
    H*W > C): v = W_v x is never formed, since context = (k x^T) W_v^T / HW; the output conv
    and q's scale are folded into the context before it meets q; the result comes out
    pixel-major, as the LayerNorm after it wants. Elsewhere the homework's computation.

    `base2` (Base2FoldedLinearAttention, the base2_softmax lever): while sampling in float32 on a
    CPU with AVX-512 kernels (exp2_pays()), the softmaxes are taken as 2^z' / sum 2^z'
    (z' = z log2 e, folded into the weights) with no max subtracted: there torch's exp2 is
    cheaper than its exp, and the max costs a pass over q and k.
    Safe while every exponent is within EXP2_LIMIT, which |w . x| <= |w| |x| bounds for each row
    w of W_q and W_k and each pixel x; weights or inputs too large for it, or a NaN, take the
    usual way. (In bfloat16 the conversions it needs cost what it saves.)"""

    base2 = False

    def forward(self, x):
        _, c, h, w = x.shape
        if h * w <= c:
            return super().forward(x)
        return self.to_out[1](self.folded(x))

    def folded(self, x):
        """x (B, C, H, W) -> the output conv's result (B, C, H, W), stored pixel-major."""
        b, c, h, w = x.shape
        n, heads = h * w, self.heads
        hidden = self.to_qkv.weight.shape[0] // 3
        d = hidden // heads
        w_q, w_k, w_v = self.to_qkv.weight.view(3, hidden, c)
        x_t = pixel_major(x)  # (B, N, C)
        x = x_t.transpose(1, 2)  # (B, C, N), a view
        if self.takes_base2(x_t):
            q = torch.bmm(x_t, (w_q * LOG2_E).t().expand(b, -1, -1)).exp2_().view(b, n, heads, d)
            q = q.div_(q.sum(dim=-1, keepdim=True))  # (B, N, heads, d)
            k = torch.bmm((w_k * LOG2_E).expand(b, -1, -1), x).exp2_()  # (B, hidden, N), unnormalized
            kx = torch.bmm(k, x_t).div_(k.sum(dim=-1, keepdim=True))  # (B, hidden, C): k's sums divide kx
        else:
            q = torch.bmm(x_t, w_q.t().expand(b, -1, -1)).view(b, n, heads, d).softmax(dim=-1)  # (B, N, heads, d)
            k = torch.bmm(w_k.expand(b, -1, -1), x).softmax(dim=-1)  # (B, hidden, N)
            kx = torch.bmm(k, x_t)  # (B, hidden, C)
        context = torch.matmul(kx.view(b, heads, d, c), w_v.view(heads, d, c).transpose(1, 2))  # (B, heads, d, e)
        conv = self.to_out[0]
        c_out = conv.out_channels
        w_out = conv.weight.view(c_out, heads, d) * (self.scale / n)  # (C_out, heads, e)
        m = torch.einsum("ohe,bhde->bhdo", w_out, context).reshape(b, hidden, c_out)
        out = torch.baddbmm(conv.bias.view(1, 1, c_out), q.view(b, n, hidden), m)  # (B, N, C_out)
        return out.view(b, h, w, c_out).permute(0, 3, 1, 2)  # (B, C_out, H, W), stored pixel-major

    def takes_base2(self, x_t):
        if not (self.base2 and sampling_now() and cuda.is_cpu(x_t.device) and x_t.dtype == torch.float32
                and exp2_pays()):
            return False
        hidden = self.to_qkv.weight.shape[0] // 3
        w = self.to_qkv.weight[: 2 * hidden].flatten(1)  # the rows of W_q and W_k
        bound = LOG2_E * w.norm(dim=1).amax() * x_t.square().sum(dim=-1).amax().sqrt()
        return bound.item() <= EXP2_LIMIT


class Base2FoldedLinearAttention(FoldedLinearAttention):
    """FoldedLinearAttention with its base-2 softmaxes on (the base2_softmax lever)."""

    base2 = True


class Residual(unet.Residual):
    """x + fn(x), the homework's fn(x) + x: the same sum, stored as x is. (The folded attention
    hands its output on pixel-major; with the homework's order the rest of the level would
    follow it into that layout, in training too.)"""

    def forward(self, x, *args, **kwargs):
        return x + self.fn(x, *args, **kwargs)


class KernelPreNorm(unet.PreNorm):
    """PreNorm(LinearAttention) while sampling on a CPU: the norm, the attention, its output
    conv and the norm after it in one compiled pass per image (hw2/fast/kernel.py), where the
    kernel is built and takes the shape; elsewhere as before."""

    def forward(self, x):
        if not (sampling_now() and kernel.takes(x, self.fn)):
            return super().forward(x)
        attention = self.fn
        b, c, h, w = x.shape
        n = h * w
        hidden = attention.to_qkv.weight.shape[0] // 3
        w_q, w_k, w_v = attention.to_qkv.weight.view(3, hidden, c)
        conv, after = attention.to_out
        out = kernel.linear_attention(pixel_major(x), self.norm.g.view(-1), w_q * LOG2_E, w_k * LOG2_E, w_v,
                                      conv.weight.view(c, hidden) * (attention.scale / n), conv.bias,
                                      after.g.view(-1), eps_for(x.dtype))  # (B, N, C) float32
        return out.to(x.dtype).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), stored pixel-major


class SubPixelUpsample(nn.Sequential):
    """unet.Upsample's nearest-neighbour 2x upsampling and 3x3 conv (its [1]) without forming the
    upsampled map (a sub-pixel convolution, Shi et al. 2016): an output pixel of row parity a
    sees, through the 3x3 kernel, only two input rows, i-1 and i (a = 0) or i and i+1 (a = 1),
    with the kernel's rows summed onto them as ROWS[a] says; the same for columns. So one 2x2
    conv with 4x the output channels, one per (row, column) parity, then a pixel shuffle: 4
    instead of 9 multiply-adds per output pixel and channel pair. The output is stored as x is."""

    # ROWS[a][r, k]: kernel row k of the 3x3 conv falls on input row r of the 2x2 window
    # (i-1, i for a = 0; i, i+1 for a = 1)
    ROWS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])

    def forward(self, x):
        conv = self[1]
        w = conv.weight  # (O, I, 3, 3)
        # The 2x2 window at padded position p covers input rows p-1 and p; parity a's window for
        # output row 2i + a starts at p = i + a, so in pixel-shuffle order (parity 1 - a first)
        # output row 2i + a is shuffled row 2i + a + 1: crop one row and column each side.
        rows = self.rows_for(w)
        kernel_2x2 = torch.einsum("ark,oikl,bcl->oabirc", rows, w, rows).reshape(-1, w.shape[1], 2, 2)
        y = F.conv2d(x, kernel_2x2, conv.bias.repeat_interleave(4), padding=1)  # (B, 4 O, H + 1, W + 1)
        return F.pixel_shuffle(y, 2)[:, :, 1:-1, 1:-1]  # (B, O, 2 H, 2 W)

    def rows_for(self, w):
        """ROWS in pixel-shuffle order, on w's device and in its dtype: made once and kept, so
        that no forward copies a constant from the host (a synchronization, and no CUDA graph)."""
        rows = self.__dict__.get("rows")
        if rows is None or rows.device != w.device or rows.dtype != w.dtype:
            with torch.inference_mode(False):  # made while sampling, used in training too
                rows = self.__dict__["rows"] = self.ROWS.flip(0).to(w.device, w.dtype)
        return rows


def is_upsample(module):
    """Whether module is what unet.Upsample builds: nn.Upsample(2, nearest), then a 3x3 conv."""
    return (type(module) is nn.Sequential and len(module) == 2 and isinstance(module[0], nn.Upsample)
            and module[0].scale_factor in (2, 2.0) and module[0].mode == "nearest"
            and isinstance(module[1], nn.Conv2d) and module[1].kernel_size == (3, 3) and module[1].padding == (1, 1)
            and module[1].stride == (1, 1))
