"""The ways this project writes a file: whole or not at all, and lines appended.

write_atomic puts the bytes in a temporary file beside the target, flushes and fsyncs
it, renames it over the target and fsyncs the folder, so a crash or a full disk at any
moment leaves either the previous version or the new one, never part of one. A
temporary file left by a killed process is removed by the next write of that target.

append_lines adds whole lines to the end of a text file in one write: a process killed in
the middle of it leaves at most one line without its newline, which complete_lines() leaves
out when the file is read.
"""
import io
import os
from pathlib import Path

import torch

TMP_INFIX = ".tmp"


def temporary_name(path, pid=None):
    """The hidden temporary file beside path that process pid writes into."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_INFIX}{os.getpid() if pid is None else pid}")


def write_atomic(path, data, durable=True):
    """Replace path's content with data (bytes or str). durable=False skips the fsyncs, for
    files no later run reads (sample images, plots): still never half-written."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    remove_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)
    return path


def append_lines(path, text):
    """Append text, whole lines each ending in a newline, to path in one write."""
    assert text.endswith("\n"), "whole lines only"
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write(text)


def complete_lines(text):
    """text without a last line that has no newline (what a kill in append_lines can leave)."""
    return text if text.endswith("\n") else text[: text.rfind("\n") + 1]


def torch_bytes(obj):
    """What torch.save writes for obj, as bytes (for write_atomic)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def fsync_folder(folder):
    """Make a rename in folder durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path):
    """Delete temporary files of path whose writer process no longer exists."""
    path = Path(path)
    prefix = f".{path.name}{TMP_INFIX}"
    if not path.parent.is_dir():
        return
    for candidate in path.parent.glob(f"{prefix}*"):
        pid = candidate.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            candidate.unlink(missing_ok=True)


def _alive(pid):
    if pid == os.getpid():
        return False  # our own leftover: a write of ours that did not finish
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
