"""The user's mistakes as one type, below every other module so that any of them can raise it."""

from __future__ import annotations


class InputError(ValueError):
    """What the user gave (a flag, a config key, a file or folder) cannot be used.

    The one type the `fedtransfer` command reports as the user's mistake: its message names the
    file, key or flag and says what to do, and the command prints it on one line and exits 2.
    Any other exception, a bare ValueError included, is a bug and must look like one (a
    traceback, exit 1), never like bad input. A ValueError, so `except ValueError` still holds it.
    """
