"""Freed memory kept for reuse, on Linux CPUs (glibc's malloc).

On a CPU every tensor comes from malloc. glibc hands freed blocks of a few megabytes
back to the kernel and asks for fresh pages at the next allocation, and the kernel
zeroes each fresh 4 KiB page at its first touch, in a page fault. A training step of the
homework model allocates and frees a few hundred such blocks, so tens of thousands of page
faults per step. Told to keep what is freed, malloc serves the next step from its own heap:
no faults, the same peak memory (benchmarks/freed_memory.py measures what it buys).

PyTorch's own CPU launcher (python -m torch.backends.xeon.run_cpu) reaches the same end
by preloading jemalloc or tcmalloc; this needs nothing installed.
"""
import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's own ceiling for it)
TRIM_THRESHOLD = 256 << 20  # freed memory kept in the heap before any goes back to the kernel

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def keep_freed_memory():
    """Set glibc's malloc to keep freed memory; return what was done, for the start-up
    line, or None where nothing was: not glibc (macOS, Windows, musl), another allocator
    preloaded, or malloc settings the user chose in the environment, which win."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a Python built without the C library's symbols in reach
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return None
    return "freed memory kept for reuse"
