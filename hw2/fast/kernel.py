"""A compiled CPU kernel for sampling: unet's PreNorm(LinearAttention) in one pass per image.

At 32 x 32 px torch computes the top level's linear attention as a chain of products and
elementwise passes, each over a q or k of 128 features per pixel, written and reread whole:
memory-bound. hw2/fast/csrc/linear_attention.c does the same per image in blocks of 16 pixels
that stay in the caches, with the LayerNorms before and after the attention in the same pass
(what it buys: benchmarks/README.md).

It is built on first use with the machine's C compiler (`cc`, or $CC) for this CPU
(-march=native), with OpenMP, and kept in ~/.cache/hw2-ddpm (or $XDG_CACHE_HOME/hw2-ddpm),
one build per source, flags, compiler and CPU; building takes about a second. Where it
cannot be built (no compiler, as on most Windows machines; no OpenMP, as with Apple's
clang), or with HW2_NO_KERNELS=1 in the environment, sampling runs on torch alone: the
same numbers to float rounding, a little slower. status() says which, for the start-up line.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

import unet
from hw2.fast import cuda

SOURCE = Path(__file__).parent / "csrc" / "linear_attention.c"
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros", "-fopenmp", "-shared", "-fPIC")
PIXELS_PER_VECTOR = 16  # the kernel's L: the pixel count must be a multiple of it
CHANNELS = (16, 32, 64, 128)  # the channel counts it is compiled for
HEADS, DIM_HEAD = 4, 32  # the homework's LinearAttention, the only one it computes

_built = {}  # "lib": the loaded library or None, "why": why None


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hw2-ddpm"


def cpu_identity():
    """What -march=native compiles for: the CPU's model and instruction sets (Linux), or
    whatever the platform says, so that a home folder shared between machines never hands
    one CPU a build for another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build():
    """Compile the kernel (or find it built) and load it; return (library, None) or (None, why)."""
    if os.environ.get("HW2_NO_KERNELS", "") not in ("", "0"):
        return None, "HW2_NO_KERNELS is set"
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        return None, "no C compiler (cc) found"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     cpu_identity().encode()])).hexdigest()[:16]
    try:
        path = cache_dir() / f"linear_attention-{key}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # then one rename: no half-written library
                out = Path(tmp) / path.name
                done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    return None, f"{Path(compiler).name} could not build it: {first_error(done.stderr)}"
                os.replace(out, path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home folder
        return None, f"could not build it: {e}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"could not load {path}: {e}"
    lib.hw2_linear_attention.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_float, ctypes.c_void_p] + [ctypes.c_int] * 4
    lib.hw2_linear_attention.restype = ctypes.c_int
    lib.hw2_exp2.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib, None


def first_error(text):
    """The compiler's first line that says error (else its first line), without the source path."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no message")
    return line.replace(str(SOURCE), SOURCE.name)


def kernel():
    """The compiled library, built once per process; None where it cannot be (status() says why)."""
    if "lib" not in _built:
        _built["lib"], _built["why"] = build()
    return _built["lib"]


def status():
    """One line for the start-up line: the kernel in use, or why not."""
    return "its linear attention in a compiled kernel" if kernel() else f"no compiled kernel ({_built['why']})"


def takes(x, attention):
    """Whether the kernel computes `attention` (unet.LinearAttention) on x (B, C, H, W): the
    homework's 4 heads of 32, where the folded form is the faster one (H*W > C), on a CPU,
    float32 or bfloat16, in the shapes it is compiled for, once it is built. (Its callers
    take it only while sampling: it computes no gradient.)"""
    b, c, h, w = x.shape
    dim_head = attention.to_qkv.weight.shape[0] // (3 * attention.heads)
    return (isinstance(attention, unet.LinearAttention) and cuda.is_cpu(x.device)
            and x.dtype in (torch.float32, torch.bfloat16)
            and (attention.heads, dim_head) == (HEADS, DIM_HEAD) and c in CHANNELS and h * w > c
            and h * w % PIXELS_PER_VECTOR == 0 and b > 0 and kernel() is not None)


def linear_attention(x_t, g_in, w_q, w_k, w_v, w_out, bias, g_out, eps):
    """x_t (B, N, C) -> (B, N, C) float32: LN(attention(LN(x_t) g_in)) g_out, what
    PreNorm(LinearAttention) computes, LN over each
    pixel's C channels with `eps`; log2 e is folded into w_q and w_k (HID, C), dim_head^-0.5 / N
    into w_out (C, HID); w_v (HID, C); bias, g_in and g_out (C,)."""
    b, n, c = x_t.shape
    x_t = x_t.float().contiguous()
    g_in = None if g_in is None else g_in.float().contiguous()
    weights = [z.float().contiguous() for z in (w_q, w_k, w_v, w_out, bias, g_out)]
    out = torch.empty(b, n, c)
    code = kernel().hw2_linear_attention(x_t.data_ptr(), None if g_in is None else g_in.data_ptr(),
                                         *(z.data_ptr() for z in weights), eps, out.data_ptr(), b, n, c,
                                         torch.get_num_threads())
    if code == -2:
        raise MemoryError(f"the linear attention kernel could not allocate its scratch for {n} pixels")
    if code != 0:
        raise ValueError(f"the linear attention kernel does not take {c} channels and {n} pixels")
    return out
