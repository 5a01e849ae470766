"""Errors the user can fix themselves."""


class UserError(Exception):
    """Bad input or environment (a missing folder, an unreadable checkpoint...).

    main.py prints the message on one line and exits with status 1, so the
    message must say what is wrong and what to do about it.
    """


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; args: (message, exit status)."""
