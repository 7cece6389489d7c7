"""The one argument parser of the ``att3d`` commands.

:class:`CommandParser` is an :class:`argparse.ArgumentParser` whose errors are one-line :class:`UsageError` s
(printed by :func:`att3d.cli.main` as ``att3d: error: ... (see 'att3d generate --help')``, exit code 2) instead
of argparse's usage text and ``SystemExit``. Built for a command path (``CommandParser("eval prior")``) it takes
its prog (``att3d eval prior``) and description from the row of :data:`att3d.cli.COMMANDS`, so that a command's
own ``--help`` matches the listing in its parent's.

Options that several commands share are added here, once: :func:`add_max_memory` (``--max-memory SIZE``, the
memory budget of :func:`att3d.utils.resources.check_memory`).
"""

from __future__ import annotations

import argparse
from typing import Any

from att3d.utils.errors import Att3dError

PROG = "att3d"


class UsageError(Att3dError):
    """A command line that att3d does not understand."""


class CommandParser(argparse.ArgumentParser):
    """argparse for ``att3d <path>``: prog and description from the command table, errors as :class:`UsageError`.

    Args:
        path: the command's words after ``att3d`` (``"generate"``, ``"eval prior"``); None: the top-level parser
            or a parser argparse builds itself (prog and description as given).
        kwargs: the keyword arguments of :class:`argparse.ArgumentParser` (``epilog``, ``description``, ...).
    """

    def __init__(self, path: str | None = None, **kwargs: Any):
        if path is not None:
            from att3d.cli import lookup

            kwargs.setdefault("prog", f"{PROG} {path}")
            kwargs.setdefault("description", lookup(path.split()).description)
        super().__init__(**kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def command_parser(path: str, **kwargs: Any) -> CommandParser:
    """``CommandParser(path, **kwargs)``: the parser of ``att3d <path>``."""
    return CommandParser(path, **kwargs)


def memory_size(text: str) -> float:
    """argparse type of ``--max-memory``: bytes of ``4GB`` / ``512MB`` / ``16GiB``, ``math.inf`` for ``none``."""
    from att3d.utils.resources import ResourceError, parse_size

    try:
        return parse_size(text)
    except ResourceError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_max_memory(parser: argparse.ArgumentParser) -> None:
    """Add ``--max-memory SIZE``: the budget a request's memory estimate is checked against before any work."""
    parser.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                        help="memory budget, e.g. 4GB or 512MB; a request whose estimate exceeds it is refused before "
                             "any work ('none': no check; default: the memory available on the machine or GPU)")
