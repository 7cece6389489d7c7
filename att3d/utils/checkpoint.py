"""Atomic, pickle-free checkpoint files.

Tensors go to safetensors; small metadata goes to JSON; optimiser states (nested
dicts of tensors and numbers) go through ``torch.save`` and are read back with
``torch.load(weights_only=True)``, which executes no pickled code. Every file is
written to a temporary name in the same folder and renamed into place, so a crash
leaves either the old or the new file, never half of one; a folder of files
(:func:`atomic_folder`) is written under a temporary name and renamed into place
the same way.

A write that the operating system refuses (no space, a file size limit, a
read-only or unwritable folder, a file in the way) is a one-line
:class:`WriteError` naming the path and the cause, with nothing half-written
left behind; ``torch.save``'s and safetensors' own messages for it (``[enforce
fail at inline_container.cc:672] . unexpected pos ...``) are translated.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from att3d.utils.errors import Att3dError, describe_os_error


class CheckpointError(Att3dError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupted or does not fit the model."""


class WriteError(Att3dError, OSError):
    """Writing a file or folder failed for a reason outside att3d (an :class:`OSError` too, with its ``errno``).

    ``str(error)`` is one line: ``cannot write PATH: No space left on device (ENOSPC; ...)``.

    Attributes:
        errno: the operating system's error number (None when unknown).
        filename: the path that could not be written.
        strerror: the operating system's description of the cause.
        cause: the :class:`OSError` (or the text) it was made from; what: the message's verb.
    """

    def __init__(self, path: str | os.PathLike, cause: OSError | str, what: str = "cannot write"):
        self.cause, self.what = cause, what
        if isinstance(cause, OSError):
            code, reason = cause.errno, cause.strerror or str(cause)
            text = describe_os_error(cause, path)
        else:
            code, reason = None, str(cause)
            text = f"{os.fspath(path)}: {' '.join(reason.split())}"
        super().__init__(code, reason, os.fspath(path))
        self.message = f"{what} {text}"

    def __str__(self) -> str:
        return self.message


# safetensors (Rust) reports an I/O error as text: "... I/O error: No space left on device (os error 28)"
_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def as_write_error(path: str | os.PathLike, error: BaseException, tmp: Path | None = None) -> WriteError | None:
    """``error`` as a :class:`WriteError` naming ``path`` when it is an operating-system failure, else None.

    A :class:`WriteError` about a file in the temporary folder ``tmp`` (of :func:`atomic_folder`) names the same
    file under ``path`` instead (where the user will look for it).
    """
    name = Path(str(error.filename)) if isinstance(error, OSError) and error.filename is not None else None
    if tmp is not None and name is not None and (name == tmp or tmp in name.parents):
        path = Path(path) / Path(*[_final_name(part) for part in name.relative_to(tmp).parts])
        if isinstance(error, WriteError):
            return WriteError(path, error.cause, error.what)
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError) and error.errno is not None:
        return WriteError(path, error)
    match = _OS_ERROR_CODE.search(str(error))
    if match:
        code = int(match.group(1))
        return WriteError(path, OSError(code, os.strerror(code)))
    return None


def _final_name(part: str) -> str:
    """The name a temporary file or folder of :func:`atomic_write` / :func:`atomic_folder` is renamed to."""
    m = re.match(r"^\.(.+?)\.(?:tmp-[0-9a-f]+|[^.]+\.tmp)$", part)
    return m.group(1) if m else part


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot open a folder)."""
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


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; a refusal (read-only, a file in the way, no permission) is a :class:`WriteError`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, OSError(errno.ENOTDIR, "a file is in the way (not a folder)"), "cannot create folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(folder, e, "cannot create folder") from None
    return folder


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` atomically.

    Raises:
        WriteError: the operating system refused (no space, file size limit, read-only, ...); the temporary file
            is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    make_dirs(path.parent)
    if path.is_dir():
        raise WriteError(path, OSError(errno.EISDIR, "a folder is in the way"))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        translated = as_write_error(path, e) if isinstance(e, Exception) else None
        if translated is not None:
            raise translated from None
        raise


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a folder of files atomically: ``with atomic_folder(dest) as tmp:`` write into ``tmp``.

    ``tmp`` is a fresh hidden folder next to ``dest`` (``.NAME.tmp-XXXX``); when the block ends it is renamed onto
    ``dest`` (an existing ``dest`` is replaced as a whole), so ``dest`` is always either the old or the complete
    new folder. When the block raises, the temporary folder is removed and ``dest`` is left alone.
    """
    folder = Path(folder)
    parent = make_dirs(folder.parent)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, OSError(errno.EEXIST, "a file is in the way (not a folder)"))
    tmp = parent / f".{folder.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise WriteError(folder, e, "cannot create folder") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        if folder.exists():
            old = parent / f".{folder.name}.old-{secrets.token_hex(4)}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        _fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        translated = as_write_error(folder, e, tmp) if isinstance(e, Exception) else None
        if translated is not None:
            raise translated from None
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the remains of an interrupted :func:`atomic_folder` / :func:`atomic_write`."""
    name = Path(path).name
    return name.startswith(".") and (".tmp-" in name or ".old-" in name or name.endswith(".tmp"))


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Atomically save a flat dict of tensors as safetensors (a refused write is a :class:`WriteError`)."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing or damaged file raises :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises several types for bad headers / short files
        raise CheckpointError(f"corrupted or truncated checkpoint file {path}: {e}") from None


def save_json(path: str | os.PathLike, data: Any) -> None:
    """Atomically write ``data`` as indented JSON (a refused write is a :class:`WriteError`)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))


def save_report(folder: str | os.PathLike, name: str, data: Any, markdown: str) -> Path:
    """Write a study's results as ``folder/name.json`` (``data``) and ``folder/name.md`` (``markdown``), each
    atomically, creating ``folder``; returns the folder."""
    folder = make_dirs(folder)
    save_json(folder / f"{name}.json", data)
    atomic_write(folder / f"{name}.md", lambda tmp: Path(tmp).write_text(markdown))
    return folder


def load_json(path: str | os.PathLike) -> Any:
    """The JSON value of ``path``; a missing, unreadable or damaged file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupted JSON file {path}: {e}") from None


class _RecordingWriter(io.RawIOBase):
    """A binary file that remembers the :class:`OSError` of a failed write: ``torch.save`` replaces it by an
    ``unexpected pos`` message that says nothing of the cause."""

    def __init__(self, file: io.BufferedWriter):
        super().__init__()
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def _torch_save(state: dict[str, Any], tmp: str) -> None:
    with open(tmp, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(state, writer)
            writer.flush()
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically save a nested state (optimiser state dicts: tensors, numbers, lists) with torch.save."""
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a state written by :func:`save_state` without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"corrupted or truncated checkpoint file {path}: {e}") from None


def rng_state() -> dict[str, torch.Tensor]:
    """The torch CPU (and CUDA, if present) RNG states as tensors."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    """Restore the RNG states of :func:`rng_state` (the CUDA ones when this machine has as many devices)."""
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8))
    if torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in sorted(tensors) if k.startswith("rng.cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
