"""Hardening of generation (issue #19): streaming and interruption, memory estimates, prompt text, unique names,
bad input of ``generate`` / ``interpolate`` / ``refine`` as real ``python -m att3d`` subprocesses."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
import trimesh
from _tiny import tiny_config

from att3d import cli
from att3d.infer import generate as gen
from att3d.model import AmortizedModel
from att3d.utils import resources as res

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "16", "--texture-size", "0", "--no-turntable", "--quiet"]


def tiny_model_config() -> dict:
    cfg = tiny_config()
    cfg["extraction"] = {"threshold": 2.0}  # an untrained field is a soft ball of density ~6 at the centre
    return cfg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-model")
    AmortizedModel(tiny_model_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    import att3d

    return att3d.load(model_dir)


def att3d_cmd(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m att3d ARGS`` in a subprocess (offline, one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("ATT3D_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "att3d", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd or ROOT)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``att3d: error: ...`` line of stderr (asserting there is exactly one and no traceback)."""
    return _one_line(proc.stderr)


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("att3d: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    return lines[0]


def run_att3d(args: list[str], real: bool, capsys) -> tuple[int, str]:
    """Exit code and stderr of ``att3d ARGS``: a real ``python -m att3d`` subprocess, or :func:`att3d.cli.main`
    in this process (the same code after the interpreter starts; cheaper, for the variants of a case)."""
    if real:
        proc = att3d_cmd(*args)
        return proc.returncode, proc.stderr
    capsys.readouterr()
    code = cli.main(args)
    return code, capsys.readouterr().err


# -- 1. streaming, interruption and --skip-existing --------------------------------------------------------------

def test_generation_streams_batch_by_batch_and_keeps_no_meshes(model, tmp_path, monkeypatch):
    """Each batch's files are on disk, and its meshes gone, before the next batch is generated."""
    real = gen.generate_meshes
    alive: weakref.WeakSet = weakref.WeakSet()
    seen: list[tuple[list[str], int, set[str]]] = []

    def spy(m, prompts, **kw):
        gc.collect()
        seen.append((list(prompts), len(alive), {p.name for p in tmp_path.glob("*.glb")}))
        meshes = real(m, prompts, **kw)
        alive.update(meshes)
        return meshes

    monkeypatch.setattr(gen, "generate_meshes", spy)
    prompts = [f"prompt {i}" for i in range(5)]
    folder = gen.OutputFolder(tmp_path, turntable=False, manifest=True)
    rows = []
    for row in gen.generate_to_folder(model, iter(prompts), folder, batch_size=2, grid_resolution=16,
                                      texture_size=0):
        assert Path(row["mesh"]).is_file()  # written before the row is handed on
        rows.append(row)
    folder.close()
    assert [s[0] for s in seen] == [prompts[0:2], prompts[2:4], prompts[4:5]]
    assert [s[1] for s in seen] == [0, 0, 0]  # no mesh of an earlier batch is still referenced
    assert [s[2] for s in seen] == [set(), {"prompt-0.glb", "prompt-1.glb"},
                                    {f"prompt-{i}.glb" for i in range(4)}]
    assert [r["prompt"] for r in rows] == prompts
    records = [json.loads(line) for line in (tmp_path / gen.MANIFEST).read_text().splitlines()]
    assert [r["slug"] for r in records] == [f"prompt-{i}" for i in range(5)]


def test_ctrl_c_keeps_the_finished_prompts(model_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real = gen.generate_meshes

    def interrupted(m, prompts, **kw):
        calls.append(list(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(m, prompts, **kw)

    monkeypatch.setattr(gen, "generate_meshes", interrupted)
    out = tmp_path / "out"
    code = cli.main(["generate", "a", "b", "c", "--checkpoint", str(model_dir), "--out", str(out),
                     "--batch-size", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 130
    assert "interrupted by Ctrl-C: 1 of 3 prompts done" in _one_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["a.glb", gen.MANIFEST]


def test_sigterm_keeps_what_it_finished_and_skip_existing_continues(model_dir, tmp_path, capsys):
    """A real ``att3d generate`` killed with SIGTERM mid-run: exit 143, complete files only, then continued."""
    prompts = [f"object number {i}" for i in range(8)]
    pfile = tmp_path / "prompts.txt"
    pfile.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    args = ["generate", "--prompts-file", str(pfile), "--checkpoint", str(model_dir), "--out", str(out),
            "--resolution", "48", "--texture-size", "32", "--frames", "6", "--turntable-resolution", "48",
            "--batch-size", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "att3d", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while len(list(out.glob("*.glb"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "--skip-existing" in err
    done = sorted(p.stem for p in out.glob("*.glb"))
    assert 2 <= len(done) < len(prompts)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    records = [json.loads(line) for line in (out / gen.MANIFEST).read_text().splitlines()]
    assert sorted(r["slug"] for r in records) == done  # every finished prompt recorded, nothing else
    for stem in done:
        assert len(trimesh.load(out / f"{stem}.glb", force="mesh").faces) > 0
        assert (out / f"{stem}.mp4").stat().st_size > 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    code, err = run_att3d(args, False, capsys)  # the same command again: refused, nothing touched
    assert code == 2
    assert "exists (an earlier run's output); add --skip-existing" in _one_line(err)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    cont = att3d_cmd(*args, "--skip-existing")
    assert cont.returncode == 0, cont.stderr
    assert f"skipping {len(done)} of {len(prompts)} prompts" in cont.stdout
    assert sorted(p.stem for p in out.glob("*.glb")) == sorted(gen.slugify(p) for p in prompts)
    assert all(before[n] == (out / n).stat().st_mtime_ns for n in before if n != gen.MANIFEST)  # not redone
    records = [json.loads(line) for line in (out / gen.MANIFEST).read_text().splitlines()]
    assert sorted(r["prompt"] for r in records) == sorted(prompts)


# -- 7. memory estimates -----------------------------------------------------------------------------------------

def test_parse_and_format_sizes():
    assert res.parse_size("4GB") == 4e9 and res.parse_size("512MiB") == 512 << 20
    assert res.parse_size("1.5G") == 1.5 * (1 << 30) and res.parse_size(" 8 gb ") == 8e9
    assert math.isinf(res.parse_size("none"))
    for bad in ("4", "4 parsecs", "-1GB", "0GB", "GB", ""):
        with pytest.raises(res.ResourceError):
            res.parse_size(bad)
    assert res.format_bytes(12.9e9) == "12.9 GB" and res.format_bytes(640e6) == "640 MB"


def test_estimates_grow_with_the_request_and_refusal_quotes_them():
    small = res.mesh_estimate(96, 256, 16, 48, 256)
    assert small.total < 1e9  # the defaults fit anywhere
    big = res.mesh_estimate(1024, 256, 1)
    assert big.total > 12.9e9  # the points of a 1024^3 grid alone are 12.9 GB
    assert res.mesh_estimate(1024, 256, 2).total > big.total
    assert res.mesh_estimate(96, 8192, 1).total > 12e9 > res.mesh_estimate(96, 2048, 1).total
    res.check_memory(small, available=int(2e9))
    res.check_memory(big, budget=math.inf, available=1)  # --max-memory none: no check
    with pytest.raises(res.ResourceError) as e:
        res.check_memory(big, available=int(8e9))
    msg = str(e.value)
    assert "\n" not in msg and "--resolution 1024" in msg and res.format_bytes(big.total) in msg
    assert "8.0 GB available on this machine" in msg
    with pytest.raises(res.ResourceError, match=r"--max-memory budget of 4.0 GB"):
        res.check_memory(res.mesh_estimate(96, 8192), budget=4e9, available=10**15)
    assert res.available_memory("cpu") > 0  # /proc/meminfo (or the cgroup) is readable here


@pytest.mark.parametrize("real, args, expected", [
    (True, ["generate", "a red cube", "--resolution", "8192"], "--resolution 8192"),
    (False, ["generate", "a red cube", "--texture-size", "8192", "--max-memory", "4GB"], "--texture-size 8192"),
    (True, ["interpolate", "a red cube", "a blue ball", "--resolution", "1024", "--max-memory", "1GB"],
     "--resolution 1024 x 60 frames"),
    (False, ["interpolate", "a", "b", "--meshes", "--texture-size", "8192", "--max-memory", "8GB"],
     "--texture-size 8192"),
    (False, ["refine", "a red cube", "--resolution", "1024", "--max-memory", "16GB"], "--resolution 1024 x 4 views"),
])
def test_cli_refuses_what_cannot_fit_before_any_work(model_dir, tmp_path, capsys, real, args, expected):
    out = tmp_path / "out"
    code, err = run_att3d([*args, "--checkpoint", str(model_dir), "--out", str(out), "--device", "cpu"], real, capsys)
    assert code == 2, err
    line = _one_line(err)
    assert line.startswith("att3d: error: this request needs about ") and expected in line and " GB" in line
    assert not out.exists()


# -- 8. / 9. prompt text on the command line --------------------------------------------------------------------

@pytest.mark.parametrize("real, args, expected", [
    (True, ["interpolate", "a red cube", ""], "prompt 2: empty prompt"),
    (False, ["interpolate", "a red cube", "   "], "prompt 2: empty prompt"),
    (False, ["interpolate", "a red \x1b[31mcube", "b"], "prompt 1: holds the control character U+001B (ESC)"),
    (True, ["generate", "a red cube", "a \x1b[2Jbell"], "prompt 2: holds the control character U+001B (ESC)"),
    (False, ["generate", "a red cube", "a \x07bell"], "prompt 2: holds the control character U+0007 (BEL)"),
    (True, ["refine", "a red \x1bcube"], "prompt: holds the control character U+001B (ESC)"),
    (False, ["refine", " "], "prompt: empty prompt"),
])
def test_cli_prompts_are_normalised_everywhere(model_dir, tmp_path, capsys, real, args, expected):
    out = tmp_path / "out"
    code, err = run_att3d([*args, "--checkpoint", str(model_dir), "--out", str(out)], real, capsys)
    assert code == 2, err
    line = _one_line(err)
    assert expected in line and "\x1b" not in err and "\x07" not in err
    assert not out.exists()


def test_interpolate_uses_the_normalised_prompts(model_dir, tmp_path, capsys):
    out = tmp_path / "anim"
    code = cli.main(["interpolate", "\ufeffa  red\u2028cube", "a blue\x85ball", "--frames", "2", "--resolution", "8",
                     "--checkpoint", str(model_dir), "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((out / "interpolation.json").read_text())
    assert info["prompts"] == ["a red cube", "a blue ball"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


# -- 10. unique names, and no silent overwrite across runs -------------------------------------------------------

def _box(size: float) -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(size, size, size))


def test_write_outputs_names_never_collide(tmp_path):
    prompts = ["a red cube", "a red cube", "a red cube 2", "A red cube", f"a red cube {gen.slugify('A red cube')[-8:]}"]
    assert gen.slugify(prompts[4]) == gen.slugify(prompts[3])  # a prompt that reads like another's hashed stem
    meshes = [_box(1.0 + i) for i in range(len(prompts))]
    rows = gen.write_outputs(meshes, prompts, tmp_path, turntable=False, progress=False)
    files = [r["mesh"] for r in rows]
    assert len(set(files)) == len(prompts) and len(list(tmp_path.iterdir())) == len(prompts)
    for i, f in enumerate(files):  # each file holds its own mesh: nothing was overwritten
        assert trimesh.load(f, force="mesh").extents[0] == pytest.approx(1.0 + i)
    rows = gen.write_outputs(meshes[::-1], prompts[::-1], tmp_path / "reversed", turntable=False, progress=False)
    assert len({r["mesh"] for r in rows}) == len(prompts)


def test_write_outputs_refuses_existing_files_before_writing_any(tmp_path):
    gen.write_outputs([_box(1)], ["b"], tmp_path, turntable=False, progress=False)
    with pytest.raises(gen.OutputExistsError, match="b.glb exists"):
        gen.write_outputs([_box(2), _box(2)], ["a", "b"], tmp_path, turntable=False, progress=False, exists="error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.glb"]  # "a" was not written either
    rows = gen.write_outputs([_box(2), _box(3)], ["a", "b"], tmp_path, turntable=False, progress=False,
                             exists="skip")
    assert [r["skipped"] for r in rows] == [False, True]
    assert trimesh.load(tmp_path / "b.glb", force="mesh").extents[0] == pytest.approx(1.0)


def test_generate_overwrite_and_recorded_names(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--checkpoint", str(model_dir), "--out", str(out), *FAST]
    assert cli.main(["generate", "A red cube", *base]) == 0
    hashed = gen.slugify("A red cube")
    # A later run's prompt that reads like the recorded hashed stem gets another name; the earlier file stays.
    assert cli.main(["generate", f"a red cube {hashed[-8:]}", *base]) == 0
    assert sorted(p.name for p in out.glob("*.glb")) == sorted([f"{hashed}.glb", f"{hashed}-2.glb"])
    before = (out / f"{hashed}.glb").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["generate", "A red cube", *base]) == 2
    assert "exists (an earlier run's output)" in capsys.readouterr().err
    assert cli.main(["generate", "A red cube", "--overwrite", *base]) == 0
    assert (out / f"{hashed}.glb").stat().st_mtime_ns != before
    assert cli.main(["generate", "A red cube", "--overwrite", "--skip-existing", *base]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_interpolate_refuses_an_earlier_run(model_dir, tmp_path, capsys):
    out = tmp_path / "anim"
    args = ["interpolate", "a", "b", "--frames", "2", "--resolution", "8", "--checkpoint", str(model_dir),
            "--out", str(out), "--device", "cpu"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "interpolation.mp4 exists (an earlier run's output); add --overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 0


# -- 11. smaller -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("real, args, expected", [
    (True, ["generate", "--prompts-file", "{tmp}"], "prompt file {tmp} is a folder, not a file"),
    (True, ["generate", "--prompts-file", "/dev/null"], "prompt file /dev/null holds no prompt"),
    (False, ["generate", "--prompts-file", "{tmp}/nope.txt"], "prompt file not found: {tmp}/nope.txt"),
    (True, ["interpolate", "a", "b", "--bogus"], "unrecognized arguments: --bogus (see 'att3d interpolate --help')"),
    (False, ["interpolate", "a", "b", "--frames", "x"], "argument --frames: invalid int value: 'x'"),
    (True, ["refine", "a", "--bogus"], "unrecognized arguments: --bogus (see 'att3d refine --help')"),
    (False, ["refine"], "the following arguments are required: prompt"),
    (False, ["refine", "a", "--max-memory", "4"], "argument --max-memory: memory size '4' needs a unit"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, real, args, expected):
    code, err = run_att3d([a.format(tmp=tmp_path) for a in args], real, capsys)
    assert code == 2, err
    assert expected.format(tmp=tmp_path) in _one_line(err)
    assert err.count("\n") == 1


def test_long_prompt_warning_is_short(model, caplog):
    prompt = "a red cube " * 500  # 5,500 characters, 1,500 tokens
    with caplog.at_level("WARNING"):
        model.embed([prompt])
    messages = [r.getMessage() for r in caplog.records if "tokens; truncated" in r.getMessage()]
    assert messages and all(len(m) < 200 for m in messages)
