"""User-facing errors.

An :class:`Att3dError` is a problem the user can fix (a missing file, a bad
option, a checkpoint from another model); the ``att3d`` command prints its
message as one line, without a traceback. Any other exception is a bug, except
the operating system's refusals of a file operation that are the user's or the
machine's to fix (:data:`USER_ERRNOS`: a full disk, a file size limit, a
read-only or unwritable folder, a path through a file), which
:func:`describe_os_error` turns into one line naming the path and the cause.
"""

from __future__ import annotations

import errno
import os

#: ``errno`` values of an :class:`OSError` that are the user's (or the machine's) to fix, not a bug.
USER_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
    errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTEMPTY, errno.EMFILE,
    errno.ENFILE, errno.ETXTBSY, errno.EBUSY, errno.EXDEV, errno.EIO,
})

#: What a user can do about the most common causes (appended to the message).
_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
    errno.EFBIG: "a file size limit (ulimit -f) or the file system's maximum file size was reached",
    errno.EROFS: "the file system is mounted read-only; write elsewhere",
    errno.EACCES: "no permission; write elsewhere or fix the folder's permissions",
    errno.EPERM: "not permitted; write elsewhere or fix the folder's permissions",
    errno.ENOTDIR: "a file is in the way where a folder is expected",
    errno.EEXIST: "a file is in the way",
}


class Att3dError(Exception):
    """Base class of the errors that att3d reports to the user as one line."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (whitespace collapsed); its type name if it has none."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return describe_os_error(error)
    text = " ".join(str(error).split())
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = " ".join(error.args[0].split())  # str(KeyError) wraps the message in quotes
    return text or type(error).__name__


def is_user_os_error(error: BaseException) -> bool:
    """Whether ``error`` is an :class:`OSError` whose cause is the user's or the machine's (:data:`USER_ERRNOS`)."""
    return isinstance(error, OSError) and error.errno in USER_ERRNOS


def describe_os_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for a refused file operation: ``cannot write PATH: No space left on device (ENOSPC; ...)``.

    Args:
        error: the :class:`OSError` (its ``filename`` names the path unless ``path`` is given).
        path: the path to name instead of ``error.filename``.
    """
    where = path if path is not None else error.filename
    cause = error.strerror or " ".join(str(error).split()) or type(error).__name__
    code = errno.errorcode.get(error.errno or -1)
    hint = _HINTS.get(error.errno or -1)
    detail = "; ".join(x for x in (code, hint) if x)
    text = f"{cause} ({detail})" if detail else cause
    if where is None:
        return text
    other = f" -> {error.filename2}" if error.filename2 is not None and path is None else ""
    return f"{os.fspath(where)}{other}: {text}"
