"""User-facing errors.

An :class:`Att3dError` is a problem the user can fix (a missing file, a bad
option, a checkpoint from another model); the ``att3d`` command prints its
message as one line, without a traceback. Any other exception is a bug.
"""

from __future__ import annotations


class Att3dError(Exception):
    """Base class of the errors that att3d reports to the user as one line."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (whitespace collapsed); its type name if it has none."""
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = " ".join(error.args[0].split())  # str(KeyError) wraps the message in quotes
    return text or type(error).__name__
