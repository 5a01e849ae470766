"""The fast U-Net: unet.Unet with hw2/fast/layers.py's equivalents swapped in, by one table.

Each row of TABLE ties a lever to the equivalent it swaps in and to the unet.py definitions
that equivalent stands in for; SHIPPED holds a fingerprint of each such definition's code as
shipped (its syntax tree without docstrings: prose may change, code may not). speed_up()
swaps an equivalent in only where its definitions are unchanged: a student who edits
unet.py's Block trains the edited Block, with its lever off, and the start-up line says so
(edited_note()). tests/test_fast.py fails when unet.py's code changes and SHIPPED is not
renewed (its message gives the fingerprints of the unet.py at hand), so a
lever is never held equal to code it was not checked against. Parameters, their names and
the state_dict stay the homework's (checked after every swap), so checkpoints are the same
either way.
"""
import ast
import dataclasses
import functools
import hashlib
import inspect
import textwrap
from typing import Callable

import torch

import diffusion
import unet
from hw2.fast import cuda, layers, replay
from hw2.fast.state import sampling_now

CPU_CHANNELS_LAST_PIXELS = 32 * 32  # on a CPU, sampling stores feature maps this large channels-last

NETWORK_LEVERS = ("fused_norms", "folded_attention", "base2_softmax", "attention_kernel", "modulation_in_norm",
                  "sub_pixel_upsample", "channels_last", "captured_sampling")
CPU_LEVERS = ("base2_softmax", "attention_kernel", "channels_last")  # they act on a CPU only (none on CUDA)
RUN_LEVERS = ("pass_size", "fused_adam")  # settings of a run, not of the network: make_adam, images_per_pass
LEVERS = NETWORK_LEVERS + RUN_LEVERS

def sampled_channels_last(device, pixels):
    """The default rule: while sampling on a CPU, maps of CPU_CHANNELS_LAST_PIXELS pixels or more
    are stored channels-last (NHWC), where oneDNN runs their 16-32 channel convolutions
    faster. (In training, and on smaller maps, channels-last costs more than it saves: its
    GroupNorm and the backward pass are slower so.)"""
    return cuda.is_cpu(device) and pixels >= CPU_CHANNELS_LAST_PIXELS


class FastUnet(unet.Unet):
    """unet.Unet.forward, step for step, with the channels_last lever: every feature map stored
    channels-last (True), none (False), or by the default rule, sampled_channels_last (None).
    The layout changes speed, never the function. `levers` is the set hw2.fast.speed_up was
    given."""

    levers = None  # what speed_up gave it
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
        if "captured_sampling" in self.levers and sampling_now() and cuda.calls().holds(x.device):
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


@dataclasses.dataclass(frozen=True)
class Lever:
    """One row of TABLE: `name` swaps `fast` in for the modules `takes` accepts (by default,
    those of exactly the class covers[0]); `covers` are the unet.py definitions whose code
    `fast` reproduces; `requires`, a lever it builds on."""

    name: str
    fast: type
    covers: tuple
    takes: Callable = None
    requires: str = None

    def applies_to(self, module):
        return self.takes(module) if self.takes else type(module) is self.covers[0]


def linear_attention_block(module):
    return type(module) is unet.PreNorm and isinstance(module.fn, unet.LinearAttention)


# The one table; for a module the first row that takes it gives its class (the most specific first).
TABLE = (
    Lever("channels_last", FastUnet, (unet.Unet,)),
    Lever("captured_sampling", FastUnet, (unet.Unet,)),
    Lever("fused_norms", layers.WeightStandardizedConv2d, (unet.WeightStandardizedConv2d,)),
    Lever("fused_norms", layers.LayerNorm, (unet.LayerNorm,)),
    Lever("base2_softmax", layers.Base2FoldedLinearAttention, (unet.LinearAttention,), requires="folded_attention"),
    Lever("folded_attention", layers.FoldedLinearAttention, (unet.LinearAttention,)),
    Lever("folded_attention", layers.Residual, (unet.Residual,)),
    Lever("modulation_in_norm", layers.Block, (unet.Block,)),
    Lever("attention_kernel", layers.KernelPreNorm, (unet.PreNorm, unet.LinearAttention, unet.LayerNorm),
          takes=linear_attention_block),
    Lever("sub_pixel_upsample", layers.SubPixelUpsample, (unet.Upsample,), takes=layers.is_upsample),
)

# unet.py's definitions as shipped: the fingerprints that TABLE's equivalents were checked against
SHIPPED = {
    "Unet": "e75c72e673a79879",
    "WeightStandardizedConv2d": "b52c397ddc2ae844",
    "LayerNorm": "8a7f8c4599cf49ef",
    "LinearAttention": "4f6a9f9e0c47e67e",
    "Residual": "8286e812d78f708b",
    "Block": "90168b7cbc76bf91",
    "PreNorm": "a89d4664fc7e46d5",
    "Upsample": "44f587dabe966b9e",
}


def fingerprint(definition):
    """A short hash of a definition's code: its source's syntax tree, docstrings left out (None
    where the source cannot be read: then no lever is held equal to it)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(definition)))
    except (OSError, TypeError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:16]


@functools.cache
def edited():
    """The names of the unet.py definitions whose code differs from what SHIPPED was made from."""
    return tuple(name for name, shipped in SHIPPED.items() if fingerprint(getattr(unet, name)) != shipped)


# unet.py and diffusion.py as shipped, whole: where either is edited the captures wait for --cuda_graph True
# (hw2/fast/step.py's capture_rule), so that a student's print or counter in the model runs at every step
SHIPPED_FILES = {
    "unet.py": "4ffa7e5380cebb21",
    "diffusion.py": "53e8c0ff1fcef22d",
}


@functools.cache
def edited_files():
    """unet.py and diffusion.py where their code (docstrings and comments aside) differs from SHIPPED_FILES."""
    return tuple(name for name, module in (("unet.py", unet), ("diffusion.py", diffusion))
                 if fingerprint(module) != SHIPPED_FILES[name])


def held(levers):
    """The levers of `levers` that hold for this unet.py: those whose definitions are as shipped
    (and whose required lever holds); the run levers always."""
    off = {row.name for row in TABLE if any(d.__name__ in edited() for d in row.covers)}
    kept = set(levers) - off
    return frozenset(x for x in kept if all(row.requires in kept for row in TABLE if row.name == x and row.requires))


def edited_note(levers=LEVERS):
    """The start-up note on unet.py's edited definitions and the levers that are off for them, or None."""
    names = edited()
    off = sorted(set(levers) - held(levers))
    if not names or not off:
        return None
    verb = "was" if len(names) == 1 else "were"
    whose = "its speed lever is" if len(off) == 1 else "their speed levers are"
    return f"note: unet.py's {' and '.join(names)} {verb} edited: {whose} off ({', '.join(off)}); it runs as written"


def speed_up(model, levers=LEVERS, channels_last=None):
    """Make the unet.Unet `model` fast in place with the levers named in `levers` that hold for
    this unet.py (held()); the same parameters and state_dict, checked. channels_last: True
    (every map), False (none) or None (the default rule, sampled_channels_last)."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers: {', '.join(sorted(unknown))}")
    if is_fast(model):
        raise ValueError("speed_up takes a unet.Unet as unet.py builds it, not one already made fast")
    on = held(levers)
    parameters, keys = [(n, tuple(p.shape)) for n, p in model.named_parameters()], list(model.state_dict())
    for module in list(model.modules()):
        rows = [row for row in TABLE if row.name in on and row.applies_to(module)]
        if rows:
            module.__class__ = rows[0].fast
    model.levers = on & frozenset(NETWORK_LEVERS)  # the network's own levers (the run's are the caller's)
    model.channels_last = channels_last
    if [(n, tuple(p.shape)) for n, p in model.named_parameters()] != parameters or list(model.state_dict()) != keys:
        raise RuntimeError("a speed lever changed the U-Net's parameters or state_dict keys; run with --plain "
                           "and report it (hw2/fast/network.py)")
    return model


def is_fast(model):
    """Whether speed_up made model fast (its FastUnet forward may be off where Unet was edited)."""
    return getattr(model, "levers", None) is not None

