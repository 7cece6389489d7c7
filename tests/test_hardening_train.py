"""Hardening of ``att3d train`` (issue 19): nothing lost, one clear line for every bad input and failing disk.

* A missing or broken ``checkpoints/latest.json`` next to complete ``step-*`` folders is an error naming the
  newest one and the command that continues from it (``resume_checkpoint=``); nothing is deleted on resume.
* A run folder is locked while a run writes to it: a second run gets one line, exit 2, and writes nothing there;
  the lock of a dead process does not block.
* A full disk (a real size-limited tmpfs), a file size limit (``ulimit -f``), a read-only file system (a
  read-only tmpfs or bind mount), no permission (a ``chmod``-ed folder without root's override capability), a
  file where a folder should be: exit 2, one line naming the path and the cause, nothing half-written.
* Every trainer option and ``extraction.threshold`` is checked before the prior loads.
* A second SIGTERM exits 143; ``step: -5`` in ``trainer_state.json`` is refused; a failed run leaves no
  ``.hydra/`` or log in a ``resume=`` folder and removes a run folder it created.
* The embedding cache: batches stream to disk, are read back memory-mapped, and a warm start embeds nothing.

File-system faults use real mounts (``mount -t tmpfs``), so these tests need root with ``CAP_SYS_ADMIN`` (as in
CI); a ``chmod`` is made to bite by dropping ``CAP_DAC_OVERRIDE`` from the child's capability bounding set.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from att3d.cli import train as app
from att3d.text.embedding_cache import EmbeddingCache, EmbeddingCacheError, prompt_key
from att3d.text.encoders import TextEmbedding
from att3d.text.prompts import PromptBank
from att3d.train.run_dir import RunDirLocked, lock_run_dir
from att3d.train.trainer import (
    TrainingError,
    checkpoint_step,
    latest_checkpoint,
    read_trainer_state,
    trainer_config_from_dict,
)
from att3d.utils.checkpoint import CheckpointError, is_temporary
from att3d.utils.errors import Att3dError

PROMPTS = ["a red cube", "a blue sphere", "a green torus", "a yellow cone", "a purple cylinder", "a pink capsule"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ENV.pop("ATT3D_DEBUG", None)


# -- set-up ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_prior_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hardening")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "prior": tiny_prior_dir, "prompts": root / "prompts.txt", "cache": root / "cache"}


def args(base: dict[str, Path], run_dir: Path | str, **extra: object) -> list[str]:
    """Overrides of a tiny run (a fraction of a second per step); ``a__b=v`` sets ``a.b=v``."""
    values: dict[str, object] = {
        "name": "test", "prompts": "file", "prompts.train": base["prompts"], "guidance.prior.path": base["prior"],
        "field.base_resolution": 4, "field.max_resolution": 8, "field.hidden_dim": 8, "mapping.hidden_dim": 16,
        "renderer.num_samples": 12, "trainer.resolution": 16, "trainer.batch_size": 4, "trainer.max_steps": 4,
        "trainer.checkpoint_every": 2, "trainer.log_every": 1, "trainer.image_every": 0, "trainer.threads": 1,
        "trainer.device": "cpu", "progress": "false", "embedding_cache": base["cache"], "run_dir": run_dir,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items() if v is not None]


def cli(*argv: object, preexec_fn=None, stdout: int = subprocess.PIPE) -> subprocess.Popen:
    """``python -m att3d ARGV`` in a subprocess (stderr piped)."""
    return subprocess.Popen([sys.executable, "-m", "att3d", *map(str, argv)], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=preexec_fn)


def finish(procs: dict[str, subprocess.Popen], timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Exit code and stderr of every process."""
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=timeout)
        out[name] = (proc.returncode, err)
    return out


def one_error_line(name: str, code: int, err: str) -> str:
    """The one ``att3d: error:`` line of a failed command (exit code 2, no traceback), without its prefix."""
    assert code == 2, f"{name}: exit {code}\n{err[-3000:]}"
    assert "Traceback" not in err, f"{name}: {err[-3000:]}"
    lines = [x for x in err.strip().splitlines() if x.startswith("att3d")]
    assert len(lines) == 1 and lines[0].startswith("att3d: error: "), f"{name}: {err[-3000:]}"
    assert err.strip().splitlines()[-1] == lines[0], f"{name}: {err[-3000:]}"
    return lines[0].removeprefix("att3d: error: ")


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-1 of its bytes; folders -> "dir")."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if rel in skip:
            continue
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def temporaries(folder: Path) -> list[str]:
    """Remains of interrupted atomic writes under ``folder``."""
    return [str(p) for p in folder.rglob(".*") if is_temporary(p)]


@pytest.fixture(scope="module")
def checkpointed(base, tmp_path_factory) -> Path:
    """A finished run (checkpoints at steps 2 and 4, the final model), made by the app in this process."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    assert app.main(args(base, run_dir)) == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step-0000002",
                                                                           "step-0000004"]
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- real file systems -----------------------------------------------------------------------------------------

@contextmanager
def tmpfs(where: Path, size: str = "8m", read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` mounted at ``where`` (read-only with ``read_only``); unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"these tests mount file systems (as in CI, as root): mount failed: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextmanager
def read_only_view(folder: Path, where: Path) -> Iterator[Path]:
    """``folder`` bind-mounted read-only at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    for cmd in (["mount", "--bind", str(folder), str(where)], ["mount", "-o", "remount,ro,bind", str(where)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(where)], check=False)
            pytest.fail(f"these tests mount file systems (as in CI, as root): {' '.join(cmd)}: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(fs: Path, leave: int = 64 * 1024) -> Path:
    """Fill the file system of ``fs`` up to ``leave`` free bytes with a ballast file."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    ballast = fs / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return ballast


def file_size_limit(limit: int):
    """``preexec_fn`` of a child with ``ulimit -f`` = ``limit`` bytes (a larger write fails with EFBIG)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def without_root_override() -> None:
    """``preexec_fn``: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that root obeys file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


# -- item 2: a missing or broken latest.json -------------------------------------------------------------------

def test_missing_or_broken_latest_json_names_the_newest_checkpoint_and_deletes_nothing(base, checkpointed,
                                                                                      tmp_path):
    missing = copy_run(checkpointed, tmp_path / "missing")
    (missing / "checkpoints" / "latest.json").unlink()
    broken = copy_run(checkpointed, tmp_path / "broken")
    (broken / "checkpoints" / "latest.json").write_text("{\"folder\": ")
    before = {run: snapshot(run, skip=(".lock",)) for run in (missing, broken)}
    procs = {run.name: cli("train", f"resume={run}", "trainer.max_steps=6") for run in (missing, broken)}
    results = finish(procs)
    for run in (missing, broken):
        line = one_error_line(run.name, *results[run.name])
        ckpt = run / "checkpoints"
        hint = (f"the newest complete checkpoint is {ckpt}/step-0000004 (step 4): continue from it with: att3d "
                f"train resume={run} resume_checkpoint=step-0000004")
        assert hint in line, line
        if run is missing:
            assert line.startswith(f"{ckpt}/latest.json is missing, but complete checkpoints are there (nothing was "
                                   "changed)"), line
        else:
            assert line.startswith(f"corrupted JSON file {ckpt}/latest.json"), line
        # nothing restarted, nothing deleted, nothing written (not even Hydra's record or log)
        assert snapshot(run, skip=(".lock",)) == before[run]
    # following the advice continues from step 4; the explicit choice is not saved in the run's config
    assert app.main([f"resume={missing}", "resume_checkpoint=step-0000004", "trainer.max_steps=6"]) == 0
    ckpt = missing / "checkpoints"
    assert json.loads((ckpt / "latest.json").read_text()) == {"folder": "step-0000006", "step": 6}
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-0000004", "step-0000006"]
    steps = [json.loads(x)["step"] for x in (missing / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resume_checkpoint: null" in (missing / "config.yaml").read_text()


def test_config_group_choices_on_resume_repeat_the_run_or_are_refused_in_one_line(checkpointed, tmp_path):
    # the run's own choices (the same command again) resume; a different one, or one that cannot be checked,
    # would replace a saved section by its name: refused, nothing written
    from omegaconf import OmegaConf

    run = copy_run(checkpointed, tmp_path / "run")
    saved = OmegaConf.load(run / "config.yaml")
    mapping, name = saved.mapping.name, saved.name
    other = "triplane" if mapping != "triplane" else "hypernetwork"
    before = snapshot(run, skip=(".lock",))
    procs = {choice: cli("train", f"resume={run}", choice, "trainer.max_steps=6")
             for choice in (f"mapping={other}", "experiment=quickstart" if name != "quickstart" else "experiment=x",
                            "prompts=shapes64")}
    results = finish(procs)
    for choice, (code, err) in results.items():
        group = choice.partition("=")[0]
        current = name if group == "experiment" else mapping
        want = (f"resume: {choice!r} chooses a config group, and a resumed run keeps the groups it was started "
                f"with: drop it (values such as trainer.max_steps=5000 still apply)" if group == "prompts" else
                f"resume: {choice!r} differs from the run's {group} ({current}): a resumed run keeps the groups it "
                f"was started with (values such as trainer.max_steps=5000 still apply)")
        assert one_error_line(choice, code, err) == want
    assert snapshot(run, skip=(".lock",)) == before
    assert app.main([f"resume={run}", f"mapping={mapping}", "trainer.max_steps=5"]) == 0
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 5


def test_latest_checkpoint_rules(tmp_path, caplog):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    assert latest_checkpoint(ckpt) is None  # a fresh run
    partial = ckpt / "step-0000002"  # a version that wrote in place crashed during the first checkpoint
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    assert checkpoint_step(partial) is None
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(ckpt) is None
    assert "none of them is complete" in caplog.text
    with pytest.raises(CheckpointError, match=r"resume_checkpoint: .*step-0000002 is incomplete \(no model_config"):
        latest_checkpoint(ckpt, checkpoint="step-0000002")
    with pytest.raises(CheckpointError, match="resume_checkpoint: .*step-0000009 is not found"):
        latest_checkpoint(ckpt, checkpoint="step-0000009")
    (ckpt / "latest.json").write_text('{"folder": "../../etc"}')
    with pytest.raises(CheckpointError, match="corrupted checkpoint pointer"):
        latest_checkpoint(ckpt)


# -- item 3: the run folder's lock -----------------------------------------------------------------------------

def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended early (exit {proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear")
        time.sleep(0.05)


def test_a_second_run_into_a_locked_folder_fails_and_a_second_sigterm_exits_143(base, tmp_path):
    """Two real runs into one run_dir: the second is refused with one line; the first goes on undisturbed, and a
    second SIGTERM stops it at once with exit code 143 (the last checkpoint stays valid)."""
    run_dir = tmp_path / "run"
    slow = {"trainer__max_steps": 100000, "trainer__resolution": 48, "renderer__num_samples": 48,
            "trainer__log_every": 1}
    first = cli("train", *args(base, run_dir, **slow), stdout=subprocess.DEVNULL)
    _wait_for(run_dir / "checkpoints" / "latest.json", first)
    second = cli("train", *args(base, run_dir, trainer__seed=7))
    code, err = finish({"second": second})["second"]
    assert one_error_line("second", code, err) == (f"run folder {run_dir} is in use by another att3d run (process "
                                                   f"{first.pid}): wait for it to end, or give another run_dir")
    assert first.poll() is None  # the first run goes on
    # SIGTERM: a checkpoint after this step; a second SIGTERM before the step ends: stop at once
    first.send_signal(signal.SIGTERM)
    while "SIGTERM received" not in first.stderr.readline():
        pass
    first.send_signal(signal.SIGTERM)
    _, rest = first.communicate(timeout=120)
    assert first.returncode == 143, rest
    last = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert rest.strip().splitlines()[-1] == (f"att3d: stopped at once by a second SIGTERM: the last checkpoint (step "
                                             f"{last}) stays valid; continue with: att3d train resume={run_dir}")
    # one run's files only: its config, its overrides, its metrics (no interleaving)
    assert "seed: 0" in (run_dir / "config.yaml").read_text()
    assert "trainer.seed=7" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= last


HOLD_LOCK = "import sys, time; from att3d.train.run_dir import lock_run_dir; l = lock_run_dir(sys.argv[1]); " \
            "print('locked', flush=True); time.sleep(600)"


def test_a_refused_run_writes_nothing_and_a_dead_holder_does_not_block(base, checkpointed, tmp_path):
    run_dir = copy_run(checkpointed, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run_dir)
        procs = {"resume": cli("train", f"resume={run_dir}", "trainer.max_steps=6"),
                 "new run": cli("train", *args(base, run_dir))}
        for name, (code, err) in finish(procs).items():
            assert one_error_line(name, code, err) == (f"run folder {run_dir} is in use by another att3d run (process "
                                                       f"{holder.pid}): wait for it to end, or give another run_dir")
        assert snapshot(run_dir) == before  # not one byte written, the lock file included
        with pytest.raises(RunDirLocked):
            lock_run_dir(run_dir)
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    assert (run_dir / ".lock").is_file()  # the stale lock file stays and does not block
    with lock_run_dir(run_dir) as lock:
        assert lock.path == run_dir / ".lock"
        assert (run_dir / ".lock").read_text().strip() == str(os.getpid())
        with lock_run_dir(run_dir):  # re-entrant in one process (the app and its trainer)
            pass
        child = subprocess.run([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(600)", "pass"), str(run_dir)],
                               capture_output=True, text=True, env=ENV)
        assert child.returncode != 0 and "is in use by another att3d run" in child.stderr  # still held by us
    child = subprocess.run([sys.executable, "-c", HOLD_LOCK.replace("time.sleep(600)", "pass"), str(run_dir)],
                           capture_output=True, text=True, env=ENV)
    assert child.returncode == 0 and child.stdout.strip() == "locked"  # released


# -- item 4: OS-level failures -----------------------------------------------------------------------------------

def test_a_full_disk_fails_with_one_line_and_keeps_the_last_checkpoint(base, tmp_path):
    with tmpfs(tmp_path / "fs", "8m") as fs:
        run_dir = fs / "run"
        assert app.main(args(base, run_dir, trainer__max_steps=2, embedding_cache="false")) == 0
        ckpt = run_dir / "checkpoints"
        kept = snapshot(ckpt / "step-0000002")
        ballast = fill(fs)
        code, err = finish({"full": cli("train", f"resume={run_dir}", "trainer.max_steps=4")})["full"]
        assert one_error_line("full disk", code, err) == (
            f"cannot write {ckpt}/step-0000004/model.safetensors: No space left on device (ENOSPC; free some space "
            "or write elsewhere)")
        assert temporaries(run_dir) == []  # nothing half-written
        assert json.loads((ckpt / "latest.json").read_text())["step"] == 2
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-0000002"]
        assert snapshot(ckpt / "step-0000002") == kept and checkpoint_step(ckpt / "step-0000002") == 2
        ballast.unlink()  # space again: the run continues from its last checkpoint
        assert app.main([f"resume={run_dir}", "trainer.max_steps=4"]) == 0
        assert json.loads((ckpt / "latest.json").read_text())["step"] == 4


def test_os_level_failures_are_one_line_naming_the_path_and_the_cause(base, checkpointed, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    locked_out = tmp_path / "no-permission"
    locked_out.mkdir()
    locked_out.chmod(0o555)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro, \
            read_only_view(copy_run(checkpointed, tmp_path / "run"), tmp_path / "ro-run") as ro_run:
        cases = {
            "ulimit -f": (cli("train", *args(base, tmp_path / "big", embedding_cache="false"),
                              preexec_fn=file_size_limit(200_000)),
                          f"cannot write {tmp_path}/big/checkpoints/step-0000002/model.safetensors: File too large "
                          "(EFBIG; a file size limit (ulimit -f) or the file system's maximum file size was reached)"),
            "read-only file system": (cli("train", *args(base, ro / "run")),
                                      f"cannot create run folder {ro}/run: Read-only file system (EROFS; the file "
                                      "system is mounted read-only; write elsewhere)"),
            "resume on a read-only file system": (
                cli("train", f"resume={ro_run}"),
                f"cannot lock the run folder: cannot write {ro_run}/.lock: Read-only file system (EROFS; the file "
                "system is mounted read-only; write elsewhere)"),
            "no permission": (cli("train", *args(base, locked_out / "run"), preexec_fn=without_root_override),
                              f"cannot create run folder {locked_out}/run: Permission denied (EACCES; no permission; "
                              "write elsewhere or fix the folder's permissions)"),
            "run_dir under a file": (cli("train", *args(base, a_file / "run")),
                                     f"run_dir: {a_file}/run lies under {a_file}, which is a file, not a folder"),
            "run_dir is a file": (cli("train", *args(base, a_file)), f"run_dir: {a_file} is a file, not a folder"),
            "resume= a file": (cli("train", f"resume={a_file}"), f"resume: {a_file} is a file, not a folder"),
        }
        results = finish({name: proc for name, (proc, _) in cases.items()})
        for name, (_, expected) in cases.items():
            assert one_error_line(name, *results[name]) == expected
    assert a_file.read_text() == "not a folder\n" and list(locked_out.iterdir()) == []
    # no half checkpoint, no temporary file
    assert temporaries(tmp_path / "big") == [] and list((tmp_path / "big" / "checkpoints").iterdir()) == []


# -- item 5: model folders are checked before use ------------------------------------------------------------

def test_bad_model_folders_are_one_line_naming_the_file_through_the_cli(tmp_path):
    """``att3d generate --checkpoint BAD`` (and ``att3d train init_from=BAD``) for model folders whose config is
    valid JSON of the wrong shape, or whose weights are integers or not finite."""
    from _tiny import tiny_config
    from safetensors.torch import load_file, save_file

    from att3d.model import AmortizedModel

    torch.manual_seed(0)
    good = AmortizedModel(tiny_config()).save_pretrained(tmp_path / "good")
    state = load_file(str(good / "model.safetensors"))
    config = json.loads((good / "model_config.json").read_text())

    def variant(name: str, cfg: object = None, weights: dict | None = None) -> Path:
        folder = copy_run(good, tmp_path / name)
        if cfg is not None:
            (folder / "model_config.json").write_text(json.dumps(cfg))
        if weights is not None:
            save_file(weights, str(folder / "model.safetensors"))
        return folder

    cases = {
        "empty config": (variant("empty", {}), "model_config.json: no text_encoder section"),
        "a list": (variant("list", [config]), "model_config.json: expected a mapping of the sections"),
        "unknown argument": (variant("arg", {**config, "field": {**config["field"], "bogus": 1}}),
                             "model_config.json: field.bogus: field 'grid' has no argument(s) bogus"),
        "unknown field": (variant("name", {**config, "field": {"name": "voxels"}}),
                          "model_config.json: field.name: unknown field 'voxels'"),
        "int64 weights": (variant("int", weights={k: v.to(torch.int64) for k, v in state.items()}),
                          "model.safetensors: "),
        "NaN weights": (variant("nan", weights={k: torch.full_like(v, float("nan")) for k, v in state.items()}),
                        "model.safetensors: "),
    }
    procs = {name: cli("generate", "--checkpoint", folder, "--out", tmp_path / f"out-{i}", "a red cube")
             for i, (name, (folder, _)) in enumerate(cases.items())}
    procs["init_from"] = cli("train", "stage=mesh", f"init_from={cases['empty config'][0]}", "trainer.device=cpu",
                             f"run_dir={tmp_path / 'mesh-run'}")
    results = finish(procs)
    for name, (folder, expected) in cases.items():
        line = one_error_line(name, *results[name])
        assert str(folder) in line and expected in line, line
        assert "threshold" not in line  # not blamed on the extraction threshold
    assert "int64, the model has float32" in one_error_line("int64", *results["int64 weights"])
    assert "hold NaN or inf values" in one_error_line("nan", *results["NaN weights"])
    line = one_error_line("init_from", *results["init_from"])
    assert line.startswith(f"{cases['empty config'][0]}/model_config.json: no text_encoder section"), line
    assert not (tmp_path / "mesh-run").exists()


# -- item 6: values refused at start ---------------------------------------------------------------------------

BAD_VALUES = {
    "extraction.threshold=nan": "extraction.threshold must be a finite density >= 0, got nan",
    "extraction.threshold=abc": "extraction.threshold must be a number, got 'abc'",
    "trainer.interpolation.prob=2": "trainer.interpolation.prob must be in [0, 1], got 2",
    "trainer.device=bogus": "trainer.device=bogus: unknown device 'bogus'; use cpu, cuda, cuda:N or auto",
    "trainer.threads=-1": "trainer.threads must be in [0, 4096], got -1",
    "trainer.interpolation.kappa=-1": "trainer.interpolation.kappa must be greater than 0, got -1",
    "trainer.lr=nan": "trainer.lr must be a finite number, got nan",
    "trainer.betas=[0.9,1.5]": "trainer.betas[1] must be in [0, 1), got 1.5",
    "trainer.keep_checkpoints=0": "trainer.keep_checkpoints must be at least 1, got 0",
    "trainer.max_steps=1.5": "trainer.max_steps must be an integer, got 1.5",
}


def test_bad_values_are_refused_before_the_prior_loads(base, tmp_path):
    """Each bad value in its own ``att3d train`` process; the prior path is a folder without a prior, so a value
    checked after the prior loads would fail on the prior instead. The run folder is not left behind."""
    not_a_prior = tmp_path / "not-a-prior"
    not_a_prior.mkdir()
    procs = {value: cli("train", *args(base, tmp_path / f"run{i}", guidance__prior__path=not_a_prior), value)
             for i, value in enumerate(BAD_VALUES)}
    for i, (value, (code, err)) in enumerate(finish(procs).items()):
        assert one_error_line(value, code, err) == BAD_VALUES[value]
        assert not (tmp_path / f"run{i}").exists()  # a run folder it failed to create properly is removed


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "trainer.batch_size must be at least 1, got 0"),
    ({"views_per_prompt": 0}, "trainer.views_per_prompt must be at least 1, got 0"),
    ({"lr": 0}, "trainer.lr must be greater than 0, got 0"),
    ({"lr": "inf"}, "trainer.lr must be a finite number, got 'inf'"),
    ({"weight_decay": -1}, "trainer.weight_decay must be at least 0, got -1"),
    ({"grad_clip": -0.5}, "trainer.grad_clip must be at least 0, got -0.5"),
    ({"radius": 0}, "trainer.radius must be greater than 0, got 0"),
    ({"fov_deg": 180}, "trainer.fov_deg must be in (0, 180), got 180"),
    ({"elevation_deg": [50, 10]}, "trainer.elevation_deg must be [low, high] with -90 <= low <= high <= 90"),
    ({"elevation_deg": [1, 2, 3]}, "trainer.elevation_deg must be a list of two finite numbers"),
    ({"seed": -1}, "trainer.seed must be in [0, 9.22337e+18], got -1"),
    ({"resolution": True}, "trainer.resolution must be an integer, got True"),
    ({"mixed_precision": "yes"}, "trainer.mixed_precision must be true or false, got 'yes'"),
    ({"device": ["cpu"]}, "trainer.device must be a string, got ['cpu']"),
    ({"device": "cuda:99"}, "trainer.device=cuda:99: "),
    ({"interpolation": 3}, "trainer.interpolation must be a mapping (prob, kappa), got 3"),
    ({"interpolation": {"prob": -0.1}}, "trainer.interpolation.prob must be in [0, 1], got -0.1"),
    ({"interpolation": {"kappa": "nan"}}, "trainer.interpolation.kappa must be a finite number, got 'nan'"),
    ({"checkpoint_every": 0}, "trainer.checkpoint_every must be at least 1, got 0"),
])
def test_every_trainer_option_is_checked(options, message):
    with pytest.raises(Att3dError) as e:
        trainer_config_from_dict(options)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_good_trainer_options_pass():
    cfg = trainer_config_from_dict({"lr_final": 0.1, "interpolation": {"prob": 1, "kappa": 0.5}, "threads": 0,
                                    "seed": "3", "elevation_deg": [-90, 90], "max_steps": 0})
    assert cfg.seed == 3 and cfg.interpolation.prob == 1.0 and cfg.elevation_deg == (-90.0, 90.0)


# -- item 11 ---------------------------------------------------------------------------------------------------

def test_trainer_state_values_are_checked(base, checkpointed, tmp_path):
    bad = copy_run(checkpointed, tmp_path / "bad")
    state_file = bad / "checkpoints" / "step-0000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "step": -5}))
    code, err = finish({"step -5": cli("train", f"resume={bad}", "trainer.max_steps=6")})["step -5"]
    assert one_error_line("step -5", code, err).startswith(
        f"corrupted checkpoint file {state_file}: step must be an integer >= 0, got -5")
    for change, message in (({"step": "4"}, "step must be an integer >= 0, got '4'"),
                            ({"bad_steps": 9}, "bad_steps must be an integer in [0, step=4], got 9"),
                            ({"order": [0, 0]}, "order repeats a prompt index"),
                            ({"order": [0, 99]}, "was trained on another prompt set"),
                            ({"order": "0,1"}, "order must be a list of prompt indices"),
                            ({"history": {}}, "history must be a list of records")):
        state_file.write_text(json.dumps({**state, **change}))
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_trainer_state(state_file, len(PROMPTS))
    state_file.write_text(json.dumps({**state, "step": 2}))  # another step than the folder's
    with pytest.raises(CheckpointError, match="step 2 in the folder of step 4"):
        from att3d.config import build_trainer, compose

        trainer = build_trainer(compose("train", args(base, bad, trainer__max_steps=6)), bad, resume=False)
        trainer.load_checkpoint(bad / "checkpoints" / "step-0000004")


def test_a_failed_run_leaves_nothing_in_a_resume_folder(base, checkpointed, tmp_path):
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine\n")
    mismatch = copy_run(checkpointed, tmp_path / "mismatch")
    before = snapshot(mismatch, skip=(".lock",))
    procs = {"not a run": cli("train", f"resume={not_a_run}"),
             "mismatch": cli("train", f"resume={mismatch}", "field.max_resolution=16")}
    results = finish(procs)
    assert one_error_line("not a run", *results["not a run"]) == (f"resume: {not_a_run} is not an att3d run folder "
                                                                   "(no config.yaml)")
    assert one_error_line("mismatch", *results["mismatch"]).startswith(
        f"checkpoint {mismatch}/checkpoints/step-0000004/model.safetensors is from another architecture")
    assert sorted(p.name for p in not_a_run.iterdir()) == ["notes.txt"]  # no .hydra/, no log, no lock
    assert snapshot(mismatch, skip=(".lock",)) == before  # its .hydra/, log and config stay the last good run's


def test_training_error_keeps_the_started_run(base, tmp_path, monkeypatch):
    """A run that failed after it started keeps its folder (record, log, metrics) for the post-mortem."""
    from att3d.train.trainer import Trainer

    def fail(self):
        raise TrainingError("stopped at step 1: test")

    monkeypatch.setattr(Trainer, "train_step", fail)
    run_dir = tmp_path / "run"
    assert app.main(args(base, run_dir)) == 2
    assert {".hydra", "config.yaml", ".lock"} <= {p.name for p in run_dir.iterdir()}


# -- item 7: the embedding cache -------------------------------------------------------------------------------

class CountingEncoder:
    """A fake text encoder: deterministic embeddings from the prompt's hash; counts calls and batch sizes."""

    max_length = 16

    def __init__(self, dim: int = 8, version: int = 0):
        self.dim, self.version, self.batches = dim, version, []

    def token_count(self, prompt: str) -> int:
        return len(prompt.split()) + 2

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        self.batches.append(len(prompts))
        seeds = [int.from_bytes(prompt_key(p)[:4], "little") + self.version for p in prompts]
        tokens = torch.stack([torch.randn(self.max_length, self.dim, generator=torch.Generator().manual_seed(s))
                              for s in seeds])
        return TextEmbedding(tokens, torch.ones(len(prompts), self.max_length, dtype=torch.bool), tokens.mean(1))


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


def test_embedding_cache_streams_batches_and_a_warm_start_embeds_nothing(tmp_path, caplog):
    prompts = [f"a red cube number {i}" for i in range(3000)]
    enc = CountingEncoder(dim=384)
    bank = PromptBank(prompts)
    before = _rss_anon_mb()
    cold = bank.embeddings("fake", enc, tmp_path, verify=True)
    assert max(enc.batches) <= 256 and sum(enc.batches) == 3000
    # 3000 x 16 x 384 float32 = 74 MB of embeddings: on disk, memory-mapped, not in this process's heap
    assert _rss_anon_mb() - before < 40
    assert cold.tokens.shape == (3000, 16, 384) and cold.mask.dtype == torch.bool
    enc.batches.clear()
    warm = PromptBank(prompts).embeddings("fake", enc, tmp_path, verify=True)
    assert enc.batches == [1]  # the probe only
    assert torch.equal(warm.tokens[1234], enc([prompts[1234]]).tokens[0])
    # a superset: only the new prompts are embedded; the result is in the bank's order
    enc.batches.clear()
    more = PromptBank(["a blue torus", *prompts[:10]]).embeddings("fake", enc, tmp_path, verify=True)
    assert sum(enc.batches) == 1 + 1 and torch.equal(more.tokens[1:], cold.tokens[:10])
    # another version of the encoder under the same tag: refused, not silently used
    with pytest.raises(EmbeddingCacheError, match="does not match the encoder"):
        PromptBank(prompts[:5]).embeddings("fake", CountingEncoder(dim=384, version=1), tmp_path, verify=True)
    # long prompts warn from the cache too (the encoder is not called for them)
    long_prompt = "a " * 30 + "cube"
    PromptBank([long_prompt]).embeddings("fake", enc, tmp_path)
    caplog.clear()
    with caplog.at_level("WARNING"):
        PromptBank([long_prompt]).embeddings("fake", enc, tmp_path)
    assert "has 33 tokens; truncated to the encoder's 16" in caplog.text


def test_embedding_cache_survives_a_damaged_shard_and_a_full_disk(tmp_path):
    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path / "cache", "fake")
    fields = lambda batch: {"tokens": enc(batch).tokens}  # noqa: E731
    first = {k: v.clone() for k, v in cache.get(["a", "b"], fields).items()}  # not the memory map damaged below
    shard = next(cache.folder.glob("shard-*"))
    (shard / "tokens.npy").write_bytes(b"\x93NUMPY garbage")
    again = cache.get(["a", "b"], fields)  # the damaged shard is skipped (with a warning) and rebuilt
    assert torch.equal(again["tokens"], first["tokens"]) and cache.stats == {"embedded": 2, "cached": 0}
    with tmpfs(tmp_path / "fs", "64k") as fs:
        small = EmbeddingCache(fs, "fake")
        with pytest.raises(Att3dError, match=r"^cannot write the embedding cache \(embedding_cache=false keeps the "
                                             r"embeddings in memory\): .*/shard-[^/]+/tokens.npy: No space left"):
            small.get([f"prompt {i}" for i in range(400)], lambda b: {"tokens": torch.zeros(len(b), 64)})
        assert temporaries(fs) == [] and list(small.folder.glob("shard-*")) == []


def test_pickled_cache_files_are_not_loaded(tmp_path):
    import numpy as np

    enc = CountingEncoder()
    cache = EmbeddingCache(tmp_path, "fake")
    cache.get(["a"], lambda b: {"tokens": enc(b).tokens})
    shard = next(cache.folder.glob("shard-*"))
    np.save(shard / "tokens.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    cache.get(["a"], lambda b: {"tokens": enc(b).tokens})  # skipped (object arrays need pickle), then rebuilt
    assert cache.stats["embedded"] == 1


def test_os_error_names_are_stable():
    from att3d.utils.errors import describe_os_error

    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y")
    assert describe_os_error(e) == "/x/y: No space left on device (ENOSPC; free some space or write elsewhere)"


def test_scratch_folders_of_dead_runs_are_removed():
    """Hydra's scratch folder of a run killed with ``kill -9`` is removed by the next ``att3d train``."""
    import tempfile

    from att3d.cli.train import SCRATCH_PREFIX, _remove_stale_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{dead.pid}-"))
    (stale / "train.log").write_text("left by a killed run\n")
    alive = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getppid()}-"))
    try:
        _remove_stale_scratch()
        assert not stale.exists() and alive.is_dir()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(alive, ignore_errors=True)
