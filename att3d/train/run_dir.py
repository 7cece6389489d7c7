"""Run folders: ``runs/<name>/<timestamp>/`` for a new run, the given folder for ``resume=``.

Under ``torchrun`` all ranks share one timestamp (``ATT3D_RUN_STAMP``, set by the ``att3d train`` command after
the process group is joined), so that they agree on the folder.

A run folder is locked while a run writes to it (:func:`lock_run_dir`: an exclusive ``fcntl.flock`` on
``RUN/.lock``, taken by rank 0): a second run into the same folder fails at once with a one-line
:class:`RunDirLocked` and writes nothing there. The kernel drops the lock when its process ends, however it ends
(``kill -9`` included), so the lock of a dead run never blocks; the ``.lock`` file itself stays (it holds the
process id of the last run that locked it, which the error names).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from datetime import datetime
from pathlib import Path

from att3d.utils.checkpoint import WriteError
from att3d.utils.errors import Att3dError

#: Environment variable holding the run folder's timestamp that all ranks of a torchrun job share.
STAMP_ENV = "ATT3D_RUN_STAMP"
#: The lock file of a run folder.
LOCK_NAME = ".lock"


class RunDirError(Att3dError):
    """A run folder cannot be used (a file in its place, not a run folder)."""


class RunDirLocked(RunDirError):
    """Another process is writing to the run folder."""


def stamp() -> str:
    """The current time as a run folder name (``2026-12-01_09-30-00``)."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_dir_for(resume: str | None, name: str) -> str:
    """The run folder of a run named ``name``: ``resume`` when given, else ``runs/<name>/<timestamp>``
    (the OmegaConf resolver ``att3d_run_dir`` of ``configs/train.yaml``)."""
    if resume not in (None, "", "None", "null"):
        return str(resume)
    return str(Path("runs") / str(name) / (os.environ.get(STAMP_ENV) or stamp()))


def check_run_dir(run_dir: str | os.PathLike, what: str = "run_dir") -> Path:
    """``run_dir`` as a path; a :class:`RunDirError` when a file (or a file above it) is in the folder's place."""
    path = Path(run_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {p}, which is a file"
                raise RunDirError(f"{what}: {path} {where}, not a folder")
            break
    return path


def save_config(cfg: dict, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    from omegaconf import OmegaConf

    from att3d.utils.checkpoint import atomic_write

    path = Path(run_dir) / "config.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


class RunDirLock:
    """An exclusive lock on a run folder (see :func:`lock_run_dir`); ``release()`` or ``with`` ends it.

    Locks are re-entrant within a process: the app and its trainer may both lock one folder (flock would refuse
    the second descriptor of the same process), and the folder stays locked until the last holder releases it.
    """

    _held: dict[str, list] = {}  # real path -> [file descriptor, holders]
    _guard = threading.Lock()

    def __init__(self, run_dir: Path, key: str):
        self.run_dir = run_dir
        self._key = key
        self._released = False

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def release(self) -> None:
        """Drop this holder's claim; the last one unlocks the folder (idempotent)."""
        if self._released:
            return
        self._released = True
        with RunDirLock._guard:
            entry = RunDirLock._held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del RunDirLock._held[self._key]
                try:
                    fcntl.flock(entry[0], fcntl.LOCK_UN)
                finally:
                    os.close(entry[0])

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a forgotten lock ends with its object
        try:
            self.release()
        except Exception:
            pass


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def lock_run_dir(run_dir: str | os.PathLike, create: bool = True) -> RunDirLock:
    """Lock ``run_dir`` for this process (creating the folder when ``create``); returns the lock.

    Raises:
        RunDirLocked: another process holds the lock (a run is writing there); nothing was written.
        RunDirError: a file is in the folder's place.
        WriteError: the folder or its lock file cannot be created (read-only file system, no space, ...).
    """
    run_dir = check_run_dir(run_dir)
    if create and not run_dir.is_dir():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(run_dir, e, "cannot create run folder") from None
    key = os.path.realpath(run_dir)
    lock_file = run_dir / LOCK_NAME
    with RunDirLock._guard:
        entry = RunDirLock._held.get(key)
        if entry is not None:
            entry[1] += 1
            return RunDirLock(run_dir, key)
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WriteError(lock_file, e, "cannot lock the run folder: cannot write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(f"run folder {run_dir} is in use by another att3d run{_holder(lock_file)}: wait "
                                   "for it to end, or give another run_dir") from None
            raise WriteError(lock_file, e, "cannot lock the run folder") from None
        try:  # who holds it, for the message of a second run (best effort: a full disk must not stop the run)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        RunDirLock._held[key] = [fd, 1]
    return RunDirLock(run_dir, key)


def holds_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock of ``run_dir``."""
    with RunDirLock._guard:
        return os.path.realpath(run_dir) in RunDirLock._held
