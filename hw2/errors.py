"""Errors the user can fix themselves, the one way long messages are shortened, and where in the
student's code something happened."""
from pathlib import Path


class UserError(Exception):
    """Bad input or environment (a missing folder, an unreadable checkpoint...).

    main.py prints the message on one line and exits with status 1, so the
    message must say what is wrong and what to do about it.
    """


class Interrupted(Exception):
    """Training stopped on a signal; args: (message, exit status)."""


def shorten(text, limit=160):
    """The first line of text, cut at a sentence or word boundary to at most about limit
    characters (never mid-word), with an ellipsis when something was cut."""
    lines = str(text).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) <= limit:
        return line
    head = line[:limit]
    for stop in (". ", "; ", ", "):
        cut = head.rfind(stop)
        if cut >= limit // 2:
            return head[:cut + 1].rstrip(",;") + " ..."
    cut = head.rfind(" ")
    return (head[:cut] if cut > 0 else head).rstrip(",;:") + " ..."


STUDENT_FILES = ("unet.py", "diffusion.py")  # the homework's files a student edits
PROJECT = Path(__file__).resolve().parents[1]


def student_line(frames, fallback=False):
    """Where in the student's code something happened, from frames (traceback.FrameSummary,
    outermost first): ' at unet.py:57' for the deepest frame in unet.py or diffusion.py. Without
    one: '', or with fallback the deepest frame outside torch and hw2/fast, the machinery that calls
    the model (' at hw2/step.py:88')."""
    import torch  # here: hw2.afhq uses this module without torch

    mine = [f for f in frames if Path(f.filename).name in STUDENT_FILES]
    if mine:
        return f" at {Path(mine[-1].filename).name}:{mine[-1].lineno}"
    machinery = (Path(torch.__file__).parent, PROJECT / "hw2" / "fast")
    outside = [f for f in frames if not any(d in Path(f.filename).resolve().parents for d in machinery)]
    if not (fallback and outside):
        return ""
    path = Path(outside[-1].filename).resolve()
    name = path.relative_to(PROJECT) if PROJECT in path.parents else path.name
    return f" at {name}:{outside[-1].lineno}"
