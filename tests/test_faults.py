"""Long runs that survive faults and bad input.

* ``kill -9`` of a real training process after its first checkpoint, then ``resume``: the same final weights
  (bit for bit) as an uninterrupted run with the same seed.
* SIGTERM: a checkpoint at the current step, exit code 143 and a one-line message; resuming from it is exact too.
* A damaged checkpoint (truncated, corrupted, missing, a pointer to nothing) is a one-line error naming the file,
  never a silent restart; loading executes no pickled code.
* NaN / inf losses skip the step and count; too many stop the run with a clear message.
* Bad input through ``att3d train``: one ``att3d: error:`` line on stderr, no traceback, exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from att3d import config
from att3d.cli import train as app
from att3d.train.trainer import Trainer, TrainingError
from att3d.utils.checkpoint import CheckpointError

# Blank lines, a comment, a duplicate (normalised away, with a warning) and a prompt longer than the text
# encoder's 16 tokens (truncated, with a warning): the run trains on 6 prompts.
LONG_PROMPT = "a red cube " + "with a small green sphere on top of a tall blue cylinder " * 3
PROMPT_FILE = f"""# shapes
a red cube

a blue sphere
a  blue   sphere
a green torus
a yellow cone

a purple cylinder
{LONG_PROMPT}
"""
MAX_STEPS = 14
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_prior_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("faults")
    (root / "prompts.txt").write_text(PROMPT_FILE)
    return tiny_prior_dir, root / "prompts.txt"


def overrides(setup: tuple[Path, Path], run_dir: Path, **extra: object) -> list[str]:
    prior_dir, prompts_file = setup
    values: dict[str, object] = {
        "name": "test", "prompts": "file", "prompts.train": str(prompts_file), "guidance.prior.path": str(prior_dir),
        "field.base_resolution": 4, "field.max_resolution": 8, "field.hidden_dim": 8, "mapping.hidden_dim": 16,
        "renderer.num_samples": 12, "trainer.resolution": 16, "trainer.batch_size": 4,
        "trainer.max_steps": MAX_STEPS, "trainer.checkpoint_every": 2, "trainer.log_every": 1,
        "trainer.image_every": 0, "trainer.threads": 1, "trainer.device": "cpu", "progress": "false",
        "run_dir": str(run_dir),
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def compose(args: list[str]) -> dict:
    return config.compose("train", args)


def make_trainer(setup: tuple[Path, Path], run_dir: Path, **extra: object) -> Trainer:
    return config.build_trainer(compose(overrides(setup, run_dir, **extra)), run_dir)


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].float() - b[k].float()).abs().max().item():.3g}"


def start_training(setup: tuple[Path, Path], run_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "att3d.cli", "train", *overrides(setup, run_dir)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 240.0) -> threading.Thread:
    """A watcher thread: ``kill -9`` the process as soon as its first checkpoint is complete (latest.json)."""
    pointer = run_dir / "checkpoints" / "latest.json"

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if pointer.is_file():
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def reference_weights(setup: tuple[Path, Path], root: Path) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted run (in this process; computed once)."""
    if "weights" not in _REFERENCE:
        _REFERENCE["weights"] = load(make_trainer(setup, root / "reference").fit())
    return _REFERENCE["weights"]


@pytest.fixture()
def reference(setup, tmp_path_factory):
    return lambda: reference_weights(setup, tmp_path_factory.getbasetemp())


def resume_in_process(run_dir: Path) -> int:
    return app.main([f"resume={run_dir}"])


def test_kill_9_loses_at_most_one_interval_and_resumes_exactly(setup, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start_training(setup, run_dir)
    watcher = kill_after_first_checkpoint(proc, run_dir)
    expected = reference()  # computed in this process meanwhile
    out, err = proc.communicate(timeout=300)
    watcher.join()
    assert proc.returncode == -signal.SIGKILL, f"training was not killed mid-run (code {proc.returncode}): {err}"
    step = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"]
    assert 2 <= step < MAX_STEPS and not (run_dir / "model").exists()  # killed mid-run
    assert resume_in_process(run_dir) == 0
    assert_identical(load(run_dir / "model"), expected)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, MAX_STEPS + 1))  # records of the lost steps were replaced, not duplicated


def _signal_at_step(monkeypatch, step: int, signum: int, times: int = 1) -> None:
    """Make the trainer send ``signum`` to this process (``times`` times) right after step ``step``."""
    original = Trainer.train_step

    def step_then_signal(self: Trainer) -> dict[str, float]:
        stats = original(self)
        if self.step == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return stats

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_and_exits_128_plus_signum(setup, reference, tmp_path, monkeypatch, capfd,
                                                                 signum):
    """A real signal to this process during the app's training: it finishes the step, writes a checkpoint there
    (step 3, between the regular ones at 2 and 4) and returns 143 / 130; resuming from it is exact."""
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signum)
    _signal_at_step(monkeypatch, 3, signum)
    assert app.main(overrides(setup, run_dir)) == 128 + signum
    monkeypatch.undo()
    assert signal.getsignal(signum) is handler  # the training's handler is gone
    out, err = capfd.readouterr()
    folder = run_dir / "checkpoints" / "step-0000003"
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text()) == {"folder": folder.name, "step": 3}
    assert (folder / "optimizer.pt").is_file() and not (run_dir / "model").exists()
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (f"att3d: interrupted by {name} at step 3: checkpoint written to {folder}; "
                                            f"continue with: att3d train resume={run_dir}")
    assert "Traceback" not in err
    # the documented normalisations of the prompt file, each with a warning
    dropped = [x for x in (out + err).splitlines() if "dropped 1 duplicate prompt(s): " in x]
    assert len(dropped) == 1 and "a blue sphere" in dropped[0], out + err
    assert "truncated to the encoder's 16" in out + err
    assert resume_in_process(run_dir) == 0
    assert_identical(load(run_dir / "model"), reference())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_second_signal_stops_at_once(setup, tmp_path, monkeypatch, capfd, signum):
    """A second signal stops at once with 128 + its number (143 for SIGTERM, not Ctrl-C's 130)."""
    run_dir = tmp_path / "run"
    _signal_at_step(monkeypatch, 3, signum, times=2)
    assert app.main(overrides(setup, run_dir)) == 128 + signum
    name = signal.Signals(signum).name
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"att3d: stopped at once by a second {name}: the last checkpoint (step 2) stays valid; continue with: "
        f"att3d train resume={run_dir}")
    # no checkpoint at step 3; the one at step 2 stays valid
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest.json", "step-0000002"]


@pytest.fixture(scope="module")
def checkpointed_run(setup, tmp_path_factory) -> Path:
    """A run folder (config.yaml, checkpoint at step 2) made by the app in this process."""
    run_dir = tmp_path_factory.mktemp("checkpointed") / "run"
    assert app.main(overrides(setup, run_dir, trainer__max_steps=2)) == 0
    return run_dir


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated model": (lambda c: _truncate(c / "step-0000002" / "model.safetensors"),
                        "corrupted or truncated checkpoint file {c}/step-0000002/model.safetensors"),
    "missing model": (lambda c: (c / "step-0000002" / "model.safetensors").unlink(),
                      "checkpoint file not found: {c}/step-0000002/model.safetensors"),
    "garbage optimizer": (lambda c: (c / "step-0000002" / "optimizer.pt").write_bytes(b"\x00garbage" * 10),
                          "corrupted or truncated checkpoint file {c}/step-0000002/optimizer.pt"),
    "truncated rng": (lambda c: _truncate(c / "step-0000002" / "rng.safetensors"),
                      "corrupted or truncated checkpoint file {c}/step-0000002/rng.safetensors"),
    "corrupted trainer state": (lambda c: (c / "step-0000002" / "trainer_state.json").write_text('{"step": 2'),
                                "corrupted JSON file {c}/step-0000002/trainer_state.json"),
    "corrupted pointer": (lambda c: (c / "latest.json").write_text("\x00\x00"),
                          "corrupted JSON file {c}/latest.json"),
    "pointer to a missing folder": (lambda c: (c / "latest.json").write_text('{"folder": "step-0000099"}'),
                                    "checkpoint folder not found: {c}/step-0000099"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_a_one_line_error_naming_the_file(setup, checkpointed_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed_run, run_dir)
    shutil.rmtree(run_dir / "model")
    ckpt = run_dir / "checkpoints"
    hurt, message = DAMAGE[damage]
    hurt(ckpt)
    pointer = (ckpt / "latest.json").read_bytes()
    with pytest.raises(CheckpointError) as err:  # from building the trainer (model weights) or from fit
        make_trainer(setup, run_dir, trainer__max_steps=4).fit(resume=True)
    text = str(err.value)
    assert "\n" not in text and text.startswith(message.format(c=ckpt)), text
    # no silent restart from scratch: nothing trained, nothing written
    assert not (run_dir / "model").exists() and (ckpt / "latest.json").read_bytes() == pointer
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest.json", "step-0000002"]


class _Exploit:
    """Pickles to a call of ``os.makedirs(path)``: what a malicious checkpoint could run on load."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_loading_executes_no_pickled_code(setup, checkpointed_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed_run, run_dir)
    optimizer_file = run_dir / "checkpoints" / "step-0000002" / "optimizer.pt"
    marker = tmp_path / "pwned"
    state = torch.load(optimizer_file, weights_only=True)
    state["payload"] = _Exploit(str(marker))
    torch.save(state, optimizer_file)
    trainer = make_trainer(setup, run_dir, trainer__max_steps=4)
    with pytest.raises(CheckpointError, match=f"checkpoint file {optimizer_file}"):
        trainer.fit(resume=True)
    assert not marker.exists()
    torch.load(optimizer_file, weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.is_dir()


def test_nan_loss_skips_and_counts_then_stops(setup, tmp_path, monkeypatch):
    trainer = make_trainer(setup, tmp_path / "run", trainer__max_bad_steps=2, trainer__max_steps=10,
                           trainer__checkpoint_every=100)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    prior = trainer.guidance.prior
    monkeypatch.setattr(prior, "predict_noise", lambda x_t, *a, **k: torch.full_like(x_t, float("nan")))
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert str(err.value) == (
        "stopped at step 3: 3 steps skipped for a non-finite loss or gradient (the last: SDS gradient (every item "
        "of the batch)), more than trainer.max_bad_steps=2; lower trainer.lr or check the prior and the field")
    assert trainer.bad_steps == 3
    # skipped steps leave the weights and the optimiser alone (the spectral norms' power iterations go on)
    assert_identical({k: v.detach() for k, v in trainer.model.named_parameters()}, before)
    assert not trainer.optimizer.state


def test_inf_loss_is_skipped_and_partial_nan_is_not(setup, tmp_path, monkeypatch):
    trainer = make_trainer(setup, tmp_path / "run", trainer__max_steps=10)
    prior = trainer.guidance.prior
    encode = prior.encode_images
    monkeypatch.setattr(prior, "encode_images", lambda rgb: encode(rgb) * float("inf"))
    assert trainer.train_step() == {"skipped": 1.0}
    assert trainer.bad_steps == 1 and trainer.step == 1
    monkeypatch.setattr(prior, "encode_images", encode)
    predict = prior.predict_noise

    def one_nan(x_t, *args, **kwargs):
        eps = predict(x_t, *args, **kwargs).clone()
        eps[0] = float("nan")
        return eps

    monkeypatch.setattr(prior, "predict_noise", one_nan)
    stats = trainer.train_step()  # the SDS zeroes the one bad item's gradient; the step goes on
    assert "skipped" not in stats and stats["sds_nonfinite"] == 1.0 and trainer.bad_steps == 1 and trainer.step == 2


def test_bad_input_is_a_one_line_error_through_the_cli(setup, checkpointed_run, tmp_path):
    """Each bad input in its own ``python -m att3d.cli train`` process (all at once: mostly interpreter start-up)."""
    (tmp_path / "latin1.txt").write_bytes("a red cube\nun cube \xe9l\xe9gant\n".encode("latin-1"))
    mismatch = tmp_path / "mismatch"
    shutil.copytree(checkpointed_run, mismatch)
    saved_config = (mismatch / "config.yaml").read_text()
    # one run folder per case: the processes run at once, and a run folder is locked by whichever gets there first
    runs = {name: tmp_path / f"run-{i}" for i, name in enumerate(["key", "missing", "latin1", "empty"])}
    cases = {
        "unknown config key": (overrides(setup, runs["key"], trainer__no_such_option=1),
                               "Could not override 'trainer.no_such_option': Key 'no_such_option' not in "
                               "'TrainerConfigSchema' (to append to your config use +trainer.no_such_option=1)"),
        "missing prompt file": (overrides(setup, runs["missing"], prompts__train=tmp_path / "nope.txt"),
                                f"prompt file not found: {tmp_path / 'nope.txt'}"),
        "non-UTF-8 prompt file": (overrides(setup, runs["latin1"], prompts__train=tmp_path / "latin1.txt"),
                                  f"prompt file {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 19)"),
        "empty prompt": (overrides(setup, runs["empty"], prompts__train="['a red cube','   ']"), "empty prompt"),
        "checkpoint of another architecture": (
            [f"resume={mismatch}", "field.max_resolution=16"],
            f"checkpoint {mismatch}/checkpoints/step-0000002/model.safetensors is from another architecture: "),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "att3d.cli", "train", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=ENV)
             for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, f"{name}: {err[-3000:]}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"att3d: error: {cases[name][1]}"), f"{name}: {err[-3000:]}"
    # the failed resume left the run's config alone (a plain resume still works), and no run was started
    assert (mismatch / "config.yaml").read_text() == saved_config
    assert not any((run / "config.yaml").exists() for run in runs.values())


def test_more_bad_input_is_a_one_line_error(setup, checkpointed_run, tmp_path, capfd):
    """More bad input through the same command, in this process (``att3d.cli.main``)."""
    from att3d.cli import main as cli_main

    (tmp_path / "blank.txt").write_text("\n   \n# nothing here\n\n")
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpointed_run, truncated)
    _truncate(truncated / "checkpoints" / "step-0000002" / "model.safetensors")
    run = tmp_path / "run"
    cases = {
        "prompt file without prompts": (overrides(setup, run, prompts__train=tmp_path / "blank.txt"),
                                        f"prompt file {tmp_path / 'blank.txt'} holds no prompt"),
        "truncated checkpoint": (
            [f"resume={truncated}"],
            f"corrupted or truncated checkpoint file {truncated}/checkpoints/step-0000002/model.safetensors: "),
        "resume of a folder that is no run": ([f"resume={tmp_path}"], f"resume: {tmp_path} is not an att3d run "
                                                                       "folder (no config.yaml)"),
        "unknown trainer option": ([*overrides(setup, run), "+trainer.bogus=1"], "unknown trainer option(s): bogus"),
        "wrong type": (overrides(setup, run, trainer__batch_size="abc"),
                       "trainer.batch_size must be an integer, got 'abc'"),
        "batch of zero": (overrides(setup, run, trainer__batch_size=0), "trainer.batch_size must be at least 1, got 0"),
        "bad component option": (overrides(setup, run, renderer__backend="nope"),
                                 "invalid configuration: backend must be one of"),
        "missing mandatory value": ([o for o in overrides(setup, run) if not o.startswith("prompts.train=")],
                                    "missing mandatory value: prompts.train (give it on the command line: "
                                    "prompts.train=...)"),
    }
    for name, (args, expected) in cases.items():
        capfd.readouterr()
        assert cli_main(["train", *args]) == 2, name
        err = capfd.readouterr().err
        assert "Traceback" not in err, f"{name}: {err[-3000:]}"
        lines = [x for x in err.strip().splitlines() if x.startswith("att3d")]
        assert len(lines) == 1 and lines[0].startswith("att3d: error: ") and expected in lines[0], f"{name}: {err}"
        assert err.strip().splitlines()[-1] == lines[0]
