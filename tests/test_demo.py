"""``att3d demo`` without a browser: input checks, the output folder, model discovery, the handlers, the page.

The browser test (tests/test_demo_browser.py) drives the served page; here the same rules are checked directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from att3d.demo import core
from att3d.demo.core import (
    MAX_PROMPT_CHARS,
    DemoBackend,
    DemoInputError,
    DemoSettings,
    OutputStore,
    file_stem,
    find_models,
    validate_fraction,
    validate_prompt,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "att3d-shapes64"
needs_model = pytest.mark.skipif(not (SHIPPED / "model.safetensors").is_file(), reason="shipped model not present")


# ---------------------------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------------------------

def test_prompt_is_normalised():
    assert validate_prompt("  a   red\tcube \n") == "a red cube"
    assert validate_prompt("une sphère rouge") == "une sphère rouge"
    assert validate_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS


@pytest.mark.parametrize("value, words", [
    ("", "empty prompt"), ("   \n\t", "empty prompt"), (None, "empty prompt"),
    ("x" * (MAX_PROMPT_CHARS + 1), "too long"), ("a " * 5000, "too long"), ("y" * 10**6, "too long"),
    (42, "must be text"), (["a red cube"], "must be text"), (b"a red cube", "must be text"), ({"a": 1}, "must be text"),
    ("a red\x00cube", "control character"), ("a \x1b[31mred cube", "control character"),
    ("a \ud800 cube", "lone surrogate"),
])
def test_bad_prompts_are_one_line_messages(value, words):
    with pytest.raises(DemoInputError) as e:
        validate_prompt(value)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fraction():
    assert validate_fraction(0) == 0.0 and validate_fraction("0.5") == 0.5 and validate_fraction(1.0) == 1.0
    for bad in (-0.1, 1.5, float("nan"), "half", None, True, [0.5]):
        with pytest.raises(DemoInputError):
            validate_fraction(bad)


@pytest.mark.parametrize("text", ["../../etc/passwd", "/etc/passwd", "..", ".hidden", "C:\\Windows\\x", "a/b\\c",
                                  "", "日本語", "a red cube"])
def test_file_stem_is_never_a_path(text):
    stem = file_stem(text)
    assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and ".." not in stem
    assert len(stem) <= 49 and stem.rsplit("-", 1)[1].isalnum()
    assert file_stem(text) == stem and file_stem(text + "!") != stem


# ---------------------------------------------------------------------------------------------------------------
# The output folder
# ---------------------------------------------------------------------------------------------------------------

def test_output_store_runs_are_bounded_and_only_its_own_are_deleted(tmp_path):
    store = OutputStore(tmp_path / "out", keep=3)
    mine = tmp_path / "out" / "notes"
    mine.mkdir()
    (tmp_path / "out" / "gen-keep-me.txt").write_text("x")
    runs = []
    for i in range(5):
        run = store.new_run("gen" if i % 2 else "interp")
        os.utime(run, (1_000_000 + i, 1_000_000 + i))  # a clear age order
        runs.append(run)
    assert core.RUN_NAME.match(runs[0].name)
    left = store.runs()
    assert len(left) == 3 and left[-1] == runs[-1]
    assert not runs[0].exists() and not runs[1].exists()
    assert mine.is_dir() and (tmp_path / "out" / "gen-keep-me.txt").is_file()
    with pytest.raises(ValueError):
        store.new_run("../x")
    with pytest.raises(ValueError):
        store.sub("../cards")


def test_output_store_contains(tmp_path):
    store = OutputStore(tmp_path / "out")
    inside = store.new_run("gen") / "a.glb"
    assert store.contains(inside) and store.check(inside) == inside.resolve()
    assert not store.contains(tmp_path / "other.glb")
    assert not store.contains(store.root / ".." / "x")
    link = store.root / "link"
    link.symlink_to(tmp_path)
    assert not store.contains(link / "x")  # resolved: outside
    with pytest.raises(ValueError):
        store.check("/etc/passwd")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_find_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = _fake_model(tmp_path / "runs" / "exp" / "2026-01-01" / "model")
    _fake_model(tmp_path / "runs" / "exp" / "2026-01-01" / "checkpoints" / "step1")  # run internals: skipped
    _fake_model(tmp_path / "runs" / ".hidden" / "model")
    b = _fake_model(tmp_path / "zoo" / "b")
    (tmp_path / "runs" / "not-a-model").mkdir()
    (tmp_path / "runs" / "not-a-model" / "model_config.json").write_text("{}")  # no weights
    found = find_models(["runs", str(b), "zoo", "missing"])
    assert found == {"runs/exp/2026-01-01/model": a.resolve(), "zoo/b": b.resolve()}
    assert list(find_models(["runs"], max_depth=2)) == []
    assert len(find_models(["runs", "zoo"], limit=1)) == 1


@needs_model
def test_find_models_default_finds_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths fall back to the repository
    assert find_models(["assets"]) == {"assets/att3d-shapes64": SHIPPED.resolve()}


def test_unknown_model_is_a_message(tmp_path):
    backend = DemoBackend({"m": tmp_path}, tmp_path / "out")
    for bad in ("other", "../../etc", None, 3):
        with pytest.raises(DemoInputError, match="unknown model"):
            backend.cache.check(bad)
    with pytest.raises(core.Att3dError, match="no model folders"):
        DemoBackend({}, tmp_path / "out")


def test_examples_are_seen_and_held_out():
    from att3d.world.shapes import heldout_captions, train_captions

    ex = core.example_prompts()
    assert ex["seen"][0] == "a red cube" and len(ex["seen"]) == 8 and set(ex["seen"]) <= set(train_captions())
    assert ex["held_out"] == heldout_captions() and "a orange cube" in ex["held_out"]


@needs_model
def test_model_card_and_figures(tmp_path):
    text = core.model_card(SHIPPED)
    assert "att3d-shapes64" in text and "![" not in text
    figures = dict((c, p) for p, c in core.card_figures(SHIPPED))
    assert {"curves.png", "eval/renders.png"} <= set(figures)
    assert core.model_card(tmp_path).startswith("*No model card")


# ---------------------------------------------------------------------------------------------------------------
# Handlers (the shipped model, small sizes)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip("shipped model not present")
    settings = DemoSettings(grid_resolution=32, texture_size=64, fine_grid_resolution=40, fine_texture_size=64,
                            slider_steps=5, video_frames=3, video_resolution=24, turntable_frames=3,
                            turntable_resolution=32)
    out = tmp_path_factory.mktemp("demo") / "out"
    return DemoBackend({"assets/att3d-shapes64": SHIPPED}, out, settings=settings, keep=6)


def _glb_ok(path: Path) -> None:
    import trimesh

    data = path.read_bytes()
    assert data[:4] == b"glTF" and int.from_bytes(data[4:8], "little") == 2
    assert int.from_bytes(data[8:12], "little") == len(data)
    scene = trimesh.load(path, file_type="glb")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 100


def test_generate_writes_glb_obj_ply_inside_the_output_folder(backend):
    label = backend.default_model
    start = backend.preload()
    assert start.glb is not None and start.glb.parent == backend.store.root / "start"
    res = backend.generate("  a  blue torus ", label)
    assert res.glb is not None and backend.store.contains(res.glb) and res.glb.name == "a-blue-torus.glb"
    assert res.glb.parent.name == res.run and core.RUN_NAME.match(res.run)
    assert "a blue torus" in res.message and res.seconds > 0 and res.vertices > 0
    _glb_ok(res.glb)
    files = backend.downloads(res.run)
    assert all(backend.store.contains(p) for p in files.values())
    with zipfile.ZipFile(files["obj"]) as z:
        names = set(z.namelist())
    assert {"a-blue-torus.obj", "a-blue-torus.mtl"} <= names and any(n.endswith(".png") for n in names)
    assert files["ply"].read_bytes().startswith(b"ply")
    fine = backend.generate("a blue torus", label, detail="fine")
    assert fine.vertices > res.vertices
    video = backend.turntable(res.run)
    assert video.is_file() and backend.store.contains(video)


def test_hostile_prompt_stays_in_the_output_folder(backend):
    # a caption (so that the model makes an object) wrapped in path traversal: the file name is a slug in the run
    res = backend.generate("../../a red cube/../../../tmp/evil/../x", backend.default_model)
    assert res.glb is not None and backend.store.contains(res.glb)
    assert res.glb.parent.parent == backend.store.root and "/" not in res.glb.name and ".." not in res.glb.name
    # a prompt with no object in it is a message, not a file and not an error
    res = backend.generate("../../../../tmp/evil/../x", backend.default_model)
    assert (res.glb is None and "No object" in res.message) or backend.store.contains(res.glb)


def test_bad_inputs_of_the_handlers(backend):
    label = backend.default_model
    with pytest.raises(DemoInputError, match="empty prompt"):
        backend.generate("   ", label)
    with pytest.raises(DemoInputError, match="unknown detail"):
        backend.generate("a red cube", label, detail="ultra")
    for run in (None, "../../etc", "gen-20260101-000000-000000000000"):
        with pytest.raises(DemoInputError):
            backend.downloads(run)
    with pytest.raises(DemoInputError, match="second prompt"):
        backend.interpolation_frame("a red cube", "", 0.5, "linear", label)
    with pytest.raises(DemoInputError, match="mode"):
        backend.interpolation_frame("a red cube", "a blue sphere", 0.5, "cubic", label)
    with pytest.raises(DemoInputError, match="between 0 and 1"):
        backend.interpolation_frame("a red cube", "a blue sphere", 2.0, "linear", label)


def test_interpolation_frames_on_demand_and_video(backend):
    import numpy as np
    import trimesh

    label = backend.default_model
    ends = [backend.interpolation_frame("a red cube", "a blue sphere", t, "linear", label) for t in (0.0, 1.0)]
    assert all(r.glb is not None and backend.store.contains(r.glb) for r in ends)
    assert ends[0].glb.parent == ends[1].glb.parent  # one request folder per interpolation
    again = backend.interpolation_frame("a red cube", "a blue sphere", 0.0, "linear", label)
    assert again is ends[0]  # cached

    def mean_colour(path):
        scene = trimesh.load(path, file_type="glb")
        mesh = next(iter(scene.geometry.values()))
        return np.asarray(mesh.visual.to_color().vertex_colors)[:, :3].mean(0)

    red, blue = mean_colour(ends[0].glb), mean_colour(ends[1].glb)
    assert red[0] > red[2] + 40 and blue[2] > blue[0] + 40  # the slider's ends are the two prompts
    video, seconds = backend.interpolation_video("a red cube", "a blue sphere", "slerp", label)
    assert video.is_file() and backend.store.contains(video) and seconds > 0


def test_card_figures_are_copied_into_the_output_folder(backend):
    text, figures = backend.card(backend.default_model)
    assert "att3d-shapes64" in text and figures
    assert all(backend.store.contains(p) for p, _ in figures)
    assert {c for _, c in figures} >= {"curves.png", "eval/renders.png"}


def test_old_requests_are_pruned(backend):
    for _ in range(8):
        backend.store.new_run("gen")
    assert len(backend.store.runs()) <= 6


# ---------------------------------------------------------------------------------------------------------------
# The page and the command
# ---------------------------------------------------------------------------------------------------------------

@needs_model
def test_build_demo_keeps_gradio_inside_the_output_folder(tmp_path, monkeypatch):
    import gradio as gr

    for var in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.delenv(var, raising=False)  # restored afterwards

    from att3d.demo.app import CONCURRENCY_ID, _guard, build_demo

    demo = build_demo({"m": SHIPPED}, tmp_path / "out", preload=False)
    assert isinstance(demo, gr.Blocks)
    root = demo.att3d_backend.store.root
    for var in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):
        assert Path(os.environ[var]).resolve().is_relative_to(root)
    out, err = _guard(lambda: 1 / 0, "generation")
    assert out is None and "ZeroDivisionError" in err and "Traceback" not in err and "\n" not in err
    out, err = _guard(lambda: validate_prompt(""), "generation")
    assert "empty prompt" in err
    # a click while the same model job runs is served afterwards, not dropped (gradio's default "once")
    jobs = [fn for fn in demo.fns.values() if fn.concurrency_id == CONCURRENCY_ID]
    assert {fn.name for fn in jobs} == {"on_generate", "on_turntable", "on_frame", "on_animate"}
    assert all(fn.trigger_mode == "always_last" and fn.concurrency_limit == 1 for fn in jobs)


def test_import_is_cheap():
    code = ("import sys, att3d, att3d.demo, att3d.demo.core, att3d.demo.command; "
            "print(sorted(m for m in ('gradio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


def _att3d(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ATT3D_DEBUG"}
    return subprocess.run([sys.executable, "-m", "att3d", *args], capture_output=True, text=True, timeout=60, env=env)


def test_command_help_and_errors(tmp_path):
    out = _att3d("demo", "--help")
    assert out.returncode == 0 and "--host" in out.stdout and "--share" in out.stdout and "127.0.0.1" in out.stdout
    assert "demo" in _att3d("--help").stdout
    for args, words in ((["--port", "0"], "--port"), (["--model", str(tmp_path / "none")], "no model folder"),
                        (["--bogus"], "unrecognized")):
        out = _att3d("demo", *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_command_port_in_use():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        out = _att3d("demo", "--port", str(s.getsockname()[1]))
    assert out.returncode == 2 and "cannot listen on 127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_the_demo_normalises_prompts_as_the_cli_does():
    from att3d.text.prompts import normalize_prompt

    for raw in ("\ufeffa red  cube ", "a Cafe\u0301 cube", "a\u2028red\tcube"):
        assert validate_prompt(raw) == normalize_prompt(raw)
    with pytest.raises(DemoInputError, match="empty prompt"):
        validate_prompt("\ufeff")
