"""Reading user-supplied text files with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path


def read_utf8_text(path: str | os.PathLike, what: str, error: type[Exception]) -> str:
    """The text of ``path``; ``error("<what> not found: ...")`` when it is missing, and
    ``error("<what> ... is not UTF-8 text (byte N)")`` when it does not decode."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start})") from None
