"""Errors the user can fix themselves, and the one way long messages are shortened."""


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
