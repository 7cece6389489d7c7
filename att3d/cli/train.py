"""``att3d train``: the Hydra application over ``configs/train.yaml`` (every stage: ``stage=nerf|mesh``).

Each run gets its own folder (``runs/<name>/<timestamp>/``) holding the resolved
config (``config.yaml``), Hydra's record (``.hydra/``), logs, TensorBoard events,
``metrics.jsonl``, checkpoints and the final model folder (``model/``).
``resume=<run folder>`` continues a run from its latest checkpoint with its saved
config; command-line overrides apply on top (e.g. a larger ``trainer.max_steps``).

Under ``torchrun`` (``WORLD_SIZE > 1``) every process runs this app: the process group
is joined before Hydra starts (gloo on the CPU, NCCL for CUDA tensors), the ranks agree
on the run folder's timestamp and use rank 0's resolved config, rank 0 alone writes
files, and ``trainer.batch_size`` is the global batch (see :mod:`att3d.train.distributed`).

The run folder is written only by the run that holds its lock (rank 0 takes it:
:func:`att3d.train.run_dir.lock_run_dir`), and only once the run has started: Hydra
writes its record (``.hydra/``) and log (``train.log``) into a scratch folder, which moves
into the run folder when the trainer is built and its checkpoint loaded. A run that
fails before that leaves nothing in a ``resume=`` folder, and removes a run folder it
created; a second run into a locked folder writes nothing there.

Exit codes: 0 done, 2 a user error (one line on stderr: bad prompt file, damaged or
mismatching checkpoint, a missing ``latest.json``, unknown config key, a value out of
range, too many non-finite steps, a run folder in use, a full, read-only or
size-limited disk), 130 / 143 stopped by SIGINT / SIGTERM after writing a checkpoint
(resume continues from it), or at once by a second one (the last checkpoint stays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from att3d.utils.errors import Att3dError, describe_os_error, is_user_os_error

log = logging.getLogger(__name__)

#: Prefix of the scratch folder that takes Hydra's record and log until the run folder is ready.
SCRATCH_PREFIX = "att3d-train-"


def run(cfg: dict[str, Any], run_dir: str | Path, on_ready: Callable[[], None] | None = None) -> Path:
    """Train with a resolved config dict; returns the final model folder.

    The checkpoint to resume from (if any) is loaded before ``config.yaml`` is (re)written, so a resume with
    overrides that do not fit the checkpoint (another field size) fails without touching the run's config.
    ``on_ready`` is called then (the app moves Hydra's record and log into the run folder). ``resume_checkpoint``
    is not saved: a later plain resume continues from ``latest.json``.
    """
    from att3d.config import build_trainer
    from att3d.train import distributed
    from att3d.train.run_dir import save_config

    try:
        trainer = build_trainer(cfg, run_dir)
    except (ValueError, TypeError) as e:  # a component rejected its options (bad value, unknown keyword)
        if isinstance(e, Att3dError):  # already one line naming the option
            raise
        raise Att3dError(f"invalid configuration: {' '.join(str(e).split())}") from None
    try:
        trainer.restore(resume=True)
        if on_ready is not None:
            on_ready()
        if distributed.current().is_main:
            save_config({**cfg, "resume_checkpoint": None} if "resume_checkpoint" in cfg else cfg, run_dir)
        return trainer.fit(resume=True)
    finally:
        trainer.close()


def _without_group_choices(overrides: list[str], saved: Any) -> list[str]:
    """On resume, the overrides without the config-group choices (``experiment=``, ``mapping=``, ...) that only
    repeat how the run was started; a choice that differs, or that cannot be checked, is refused in one line.

    The saved config has no groups left, only their values: merged as a dotlist, a bare choice would replace a
    whole section by its name. A choice refined by later keys of its section (``prompts=file
    prompts.train=my.txt``) is a section and is merged as given. The run's choice is the section's ``name`` (the
    top-level ``name`` for ``experiment``)."""
    from omegaconf import OmegaConf

    from att3d.utils.paths import configs_dir

    groups = {p.name for p in configs_dir().iterdir() if p.is_dir()}
    kept = []
    for n, override in enumerate(overrides):
        key, _, value = override.partition("=")
        group = key.lstrip("+~")
        if group not in groups or any(o.partition("=")[0].lstrip("+~").startswith(group + ".")
                                      for o in overrides[n + 1:]):
            kept.append(override)
            continue
        current = OmegaConf.select(saved, "name" if group == "experiment" else f"{group}.name", default=None)
        if current is None:
            raise Att3dError(f"resume: {override!r} chooses a config group, and a resumed run keeps the groups it "
                             f"was started with: drop it (values such as trainer.max_steps=5000 still apply)")
        if str(current) != value:
            raise Att3dError(f"resume: {override!r} differs from the run's {group} ({current}): a resumed run keeps "
                             f"the groups it was started with (values such as trainer.max_steps=5000 still apply)")
    return kept


def _resolved_config(cfg: Any, task_overrides: list[str]) -> dict[str, Any]:
    """The run's config as a plain dict: the saved ``config.yaml`` plus the overrides on resume."""
    from omegaconf import OmegaConf

    from att3d.train.run_dir import check_run_dir

    run_dir = Path(cfg.run_dir)
    saved = run_dir / "config.yaml"
    check_run_dir(run_dir, "resume" if cfg.resume else "run_dir")
    if cfg.resume and saved.is_file():
        overrides = [o for o in task_overrides if not o.startswith("resume=")]
        try:
            base = OmegaConf.load(saved)
        except Exception as e:  # a YAML or OmegaConf error: the file was edited or damaged
            raise Att3dError(f"cannot read {saved}: {' '.join(str(e).split())}") from None
        overrides = _without_group_choices(overrides, base)
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        cfg.resume = str(run_dir)
        cfg.run_dir = str(run_dir)  # where the run is now (it may have been moved since)
    elif cfg.resume:
        raise Att3dError(f"resume: {run_dir} is not an att3d run folder (no config.yaml)")
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # e.g. prompts=file without .train


class _RunFolder:
    """Rank 0's hold on the run folder: its lock, whether this run created it, and Hydra's scratch outputs.

    Args:
        run_dir: the run folder.
        scratch: the folder Hydra writes ``.hydra/`` and its log into until :meth:`adopt` moves them.
    """

    def __init__(self, run_dir: Path, scratch: Path | None):
        from att3d.train.run_dir import lock_run_dir

        self.run_dir = run_dir
        self.scratch = scratch
        self.created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # the run folder first
        self.lock = lock_run_dir(run_dir)  # RunDirLocked before anything is written
        self.adopted = False

    def adopt(self) -> None:
        """Move Hydra's record (``.hydra/``) and log from the scratch folder into the run folder; the log goes on
        in the run folder (appended to an existing one on resume)."""
        from att3d.utils.checkpoint import atomic_write

        self.adopted = True
        if self.scratch is None:
            return
        record = self.scratch / ".hydra"
        if record.is_dir():
            target = self.run_dir / ".hydra"
            target.mkdir(exist_ok=True)
            for f in record.iterdir():
                text = f.read_text()
                if f.name == "hydra.yaml":  # it names the scratch folder as the run's output folder
                    text = text.replace(str(self.scratch), str(self.run_dir.resolve()))
                atomic_write(target / f.name, lambda tmp, t=text: Path(tmp).write_text(t))
        root = logging.getLogger()
        for h in list(root.handlers):
            name = getattr(h, "baseFilename", None)
            if not isinstance(h, logging.FileHandler) or name is None or Path(name).parent != self.scratch:
                continue
            h.flush()
            h.close()
            moved = logging.FileHandler(self.run_dir / Path(name).name, mode="a", encoding=h.encoding)
            moved.setLevel(h.level)
            moved.setFormatter(h.formatter)
            for flt in h.filters:
                moved.addFilter(flt)
            with open(name, encoding=h.encoding or "utf-8", errors="replace") as src:
                moved.stream.write(src.read())
            moved.flush()
            root.removeHandler(h)
            root.addHandler(moved)

    def release(self, failed: bool) -> None:
        """Unlock; after a failure before the run started, remove the folders this run created (nothing of a run
        is in them: Hydra's outputs are still in the scratch folder)."""
        self.lock.release()
        if failed and not self.adopted and self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for p in self.created[1:]:
                with contextlib.suppress(OSError):
                    p.rmdir()  # only when empty


def _quiet_worker_logging() -> None:
    """Ranks other than 0 log warnings to the console only (rank 0 keeps Hydra's log file)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.WARNING)


def _quiet_libraries(progress: bool) -> None:
    """Keep third-party chatter off the console (``ATT3D_DEBUG=1`` keeps it): warnings of transformers and
    diffusers, and with ``progress=false`` their loading progress bars (read when they are first imported)."""
    if os.environ.get("ATT3D_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off"):
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _config_error(e: BaseException) -> Att3dError:
    """One line from Hydra's / OmegaConf's error and its cause, e.g. ``Could not override 'trainer.x': Key 'x' is
    not in struct (to append to your config use +trainer.x=1)``."""
    key = getattr(e, "full_key", None)
    if key and type(e).__name__ == "MissingMandatoryValue":
        return Att3dError(f"missing mandatory value: {key} (give it on the command line: {key}=...)")
    if key and type(e).__module__.split(".")[0] == "omegaconf":
        text = str(getattr(e, "msg", "") or type(e).__name__).strip().splitlines()[0].replace("$KEY", str(key))
        return Att3dError(f"{text}{'' if str(key) in text else f' ({key})'}")
    lines = [" ".join(x.split()) for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
    msg = lines[0]
    cause = e.__cause__ or e.__context__
    first = next((x.strip() for x in str(cause).splitlines() if x.strip()), "") if cause is not None else ""
    if first and first not in msg:
        msg = f"{msg.rstrip('.')}: {first}"
    if len(lines) > 1:
        rest = " ".join(lines[1:])
        msg = f"{msg} ({rest[0].lower()}{rest[1:]})"
    return Att3dError(msg)


def _remove_stale_scratch() -> None:
    """Remove the scratch folders of ``att3d train`` processes that died without cleaning up (``kill -9``)."""
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # dead: its scratch folder is garbage
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive (another user's process, say): leave it
            pass


def _world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset), read without importing torch."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 2  # let att3d.train.distributed report the bad value


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``att3d train [overrides...]``; returns the exit code."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from att3d.config import register_resolvers
    from att3d.train.run_dir import STAMP_ENV, stamp
    from att3d.utils.paths import configs_dir

    register_resolvers()
    argv = list(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"code": 0}
    wants_output = not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help", "--shell-completion")
                           or a.startswith(("--cfg=", "--info=")) for a in argv)
    scratch: Path | None = None
    distributed: Any = None  # att3d.train.distributed (imports torch): only in a multi-process job
    rank, is_main, multi = 0, True, False
    joined = False
    saved_env = {k: os.environ.get(k) for k in (STAMP_ENV, "HYDRA_FULL_ERROR", "TRANSFORMERS_VERBOSITY",
                                                 "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    if _world_size() > 1:
        from att3d.train import distributed

        info = distributed.env_info()
        rank, is_main, multi = info.rank, info.is_main, True
        joined = not distributed.current().enabled
        distributed.init_from_env()
        os.environ[STAMP_ENV] = str(distributed.broadcast_object(stamp()))  # one run folder for all ranks
        if not is_main:
            argv.append("hydra.output_subdir=null")  # rank 0 writes .hydra/
    if wants_output:  # Hydra's record and log go here until the run folder is locked and the run has started
        _remove_stale_scratch()
        try:
            scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-")).resolve()
        except OSError as e:  # no writable temporary folder: Hydra writes into the run folder at once
            log.debug("no scratch folder for Hydra's outputs: %s", e)
        else:
            argv.append(f"hydra.run.dir={scratch}")
    # Config errors come back as exceptions (one line through att3d.cli), not as Hydra's multi-line report.
    os.environ["HYDRA_FULL_ERROR"] = "1"

    @hydra.main(version_base=None, config_path=str(configs_dir()), config_name="train")
    def _app(cfg: DictConfig) -> None:
        if not is_main:
            _quiet_worker_logging()
        folder_hold: _RunFolder | None = None
        failed = True
        try:
            failure, container = None, None
            if is_main:
                try:
                    container = _resolved_config(cfg, list(HydraConfig.get().overrides.task))
                    folder_hold = _RunFolder(Path(container["run_dir"]), scratch)
                except Att3dError as e:
                    failure = str(e)
                except OSError as e:
                    if not is_user_os_error(e):
                        raise
                    failure = describe_os_error(e)
                except Exception as e:  # e.g. OmegaConf's MissingMandatoryValue for prompts.train=???
                    if type(e).__module__.split(".")[0] not in ("hydra", "omegaconf"):
                        raise
                    failure = str(_config_error(e))
            if multi:  # every rank trains with rank 0's config (and fails with its error)
                failure, container = distributed.broadcast_object((failure, container))
            if failure is not None:
                raise Att3dError(failure)
            _quiet_libraries(bool(container.get("progress", True)))
            folder = run(container, Path(container["run_dir"]),
                         on_ready=folder_hold.adopt if folder_hold is not None else None)
            failed = False
            if is_main:
                print(f"model written to {folder}")
        except Att3dError as e:
            interrupted = getattr(e, "exit_code", None)  # att3d.train.trainer.TrainingInterrupted
            if interrupted is not None:
                if is_main:
                    print(f"att3d: {e}", file=sys.stderr)
                result["code"] = int(interrupted)
            else:
                where = f"[rank {rank}] " if multi else ""
                print(f"att3d: error: {where}{' '.join(str(e).split())}", file=sys.stderr)
                result["code"] = 2
        except OSError as e:  # a full, read-only or size-limited disk, a file in the way: the user's to fix
            if not is_user_os_error(e):
                raise
            where = f"[rank {rank}] " if multi else ""
            print(f"att3d: error: {where}{describe_os_error(e)}", file=sys.stderr)
            result["code"] = 2
        except KeyboardInterrupt as e:  # Ctrl-C outside the training loop, or a second signal inside it
            message = getattr(e, "message", None)
            if is_main:
                print(f"att3d: {message}" if message else "att3d: interrupted", file=sys.stderr)
            result["code"] = int(getattr(e, "exit_code", 130))
        finally:
            if folder_hold is not None:
                folder_hold.release(failed)

    old = sys.argv
    sys.argv = ["att3d train", *argv]
    # Hydra configures the root logger (console + file handlers); undo that when the app returns, so that an
    # in-process caller (tests, notebooks) keeps its own logging and no handler outlives its stream.
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        _app()
    except SystemExit as e:  # Hydra exits on --help / --cfg after printing
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("hydra", "omegaconf"):
            raise _config_error(e) from None
        raise
    finally:
        sys.argv = old
        for h in root.handlers[:]:
            if h not in saved_handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved_level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if joined:
            distributed.shutdown()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return int(result["code"])
