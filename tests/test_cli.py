"""The ``att3d`` command: help, lazy dispatch, one-line errors (all fast: no torch is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import att3d
from att3d import cli
from att3d.utils.errors import Att3dError

SUBCOMMANDS = ["train", "generate", "interpolate", "refine", "eval", "bench"]

FAKE_MODULE = '''
import sys
from att3d.utils.errors import Att3dError

def main(argv):
    what = argv[0] if argv else "ok"
    if what == "ok":
        print("fake got", argv)
        return 0
    if what == "user":
        raise Att3dError("bad input\\nover two lines")
    if what == "bug":
        raise ValueError("something broke")
    if what == "missing":
        raise FileNotFoundError(2, "No such file or directory", "nowhere.txt")
    if what == "interrupt":
        raise KeyboardInterrupt
    if what == "exit":
        sys.exit(3)
    if what == "dependency":
        import att3d_no_such_dependency  # noqa: F401
    if what == "nospace":
        raise OSError(28, "No space left on device", "/data/out/model.glb")
    if what == "readonly":
        raise OSError(30, "Read-only file system", "/data/out")
    if what == "exists":
        raise FileExistsError(17, "File exists", "/data/out")
    if what == "enforce":  # torch.save on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    if what == "safetensors":
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    if what == "oserror-bug":
        raise OSError(22, "Invalid argument")
    if what == "second-signal":
        class StoppedAtOnce(KeyboardInterrupt):
            exit_code = 143
            message = "stopped at once by a second SIGTERM"
        raise StoppedAtOnce()
    return int(what)
'''


def run_cli(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m att3d ARGS`` (or ``python -c CODE ARGS``) in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "ATT3D_DEBUG"}
    full_env.update(env or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "att3d", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=60)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A subcommand ``att3d fake`` whose module behaves as its first argument says."""
    (tmp_path / "att3d_fake_cmd.py").write_text(FAKE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ATT3D_DEBUG", raising=False)
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("att3d_fake_cmd:main", "a fake", "A fake command."))
    monkeypatch.setitem(cli.COMMANDS, "ghost", cli.Command("att3d_no_such_pkg.sub:main", "missing", "Not written."))
    yield
    sys.modules.pop("att3d_fake_cmd", None)


def test_help_lists_every_subcommand():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert f"\n    {name} " in r.stdout
    assert "ATT3D_DEBUG" in r.stdout


def test_console_script_and_module_entry_points():
    script = Path(sys.executable).parent / "att3d"
    if script.exists():
        r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == f"att3d {att3d.__version__}"
    r = run_cli("--version", code="import sys; from att3d.cli import main; sys.exit(main())")
    assert r.stdout.strip() == f"att3d {att3d.__version__}"
    r = subprocess.run([sys.executable, "-m", "att3d.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage: att3d" in r.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_explains_it(name):
    r = run_cli(name, "--help")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    if name == "train":  # the Hydra app's help: its config groups
        assert "prompts" in r.stdout and "guidance" in r.stdout
    else:
        assert r.stdout.startswith("usage: att3d"), r.stdout[:200]
        assert len(r.stdout.splitlines()) > 3


def test_a_missing_target_module_is_one_line(fake, capsys):
    assert cli.main(["ghost", "a", "b"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("att3d: error: ") and "att3d_no_such_pkg" in err


def test_every_command_row_names_a_function():
    code = textwrap.dedent("""
        from att3d import cli

        def rows(table, words=()):
            for name, cmd in table.items():
                yield from rows(cmd.subcommands, (*words, name)) if cmd.subcommands else [((*words, name), cmd)]

        for words, cmd in rows(cli.COMMANDS):
            if words == ("demo",):  # needs the optional gradio extra
                continue
            assert callable(cli.import_target(cmd.target)), words
            assert cli.lookup(list(words)) is cmd
        print("ok")
    """)
    r = run_cli(code=code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_arguments_are_forwarded_untouched(fake, capsys):
    args = ["ok", "prompts=shapes64", "trainer.max_steps=2000", "--cfg", "job", "--", "-x"]
    assert cli.main(["fake", *args]) == 0
    assert capsys.readouterr().out == f"fake got {args}\n"
    assert cli.main(["fake", "7"]) == 7


@pytest.mark.parametrize(
    ("what", "code", "message"),
    [
        ("user", 2, "att3d: error: bad input over two lines"),
        ("missing", 2, "att3d: error: nowhere.txt: No such file or directory (ENOENT)"),
        ("bug", 1, "att3d: error: internal error: ValueError: something broke; ATT3D_DEBUG=1 shows the traceback"),
        ("interrupt", 130, "att3d: interrupted"),
        ("nospace", 2, "att3d: error: /data/out/model.glb: No space left on device (ENOSPC; free some space or write "
                       "elsewhere)"),
        ("readonly", 2, "att3d: error: /data/out: Read-only file system (EROFS; the file system is mounted "
                        "read-only; write elsewhere)"),
        ("exists", 2, "att3d: error: /data/out: File exists (EEXIST; a file is in the way)"),
        ("enforce", 2, "att3d: error: a file could not be written (a full disk, a file size limit or a read-only "
                       "folder?): [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
        ("safetensors", 2, "att3d: error: No space left on device (ENOSPC; free some space or write elsewhere)"),
        ("oserror-bug", 1, "att3d: error: internal error: OSError: Invalid argument (EINVAL); ATT3D_DEBUG=1 shows "
                           "the traceback"),
        ("second-signal", 143, "att3d: stopped at once by a second SIGTERM"),
    ],
)
def test_errors_are_one_line_without_traceback(fake, capsys, what, code, message):
    assert cli.main(["fake", what]) == code
    captured = capsys.readouterr()
    assert captured.err == message + "\n"
    assert "Traceback" not in captured.out + captured.err


def test_missing_dependency_is_named(fake, capsys):
    assert cli.main(["fake", "dependency"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "att3d_no_such_dependency" in err


def test_system_exit_of_a_subcommand_is_its_exit_code(fake):
    assert cli.main(["fake", "exit"]) == 3


def test_debug_shows_the_traceback(fake, capsys, monkeypatch):
    monkeypatch.setenv("ATT3D_DEBUG", "1")
    assert cli.main(["fake", "user"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "Att3dError: bad input" in err
    assert err.rstrip().splitlines()[-1] == "att3d: error: bad input over two lines"


def test_subprocess_error_and_debug(tmp_path):
    (tmp_path / "att3d_fake_cmd.py").write_text(FAKE_MODULE)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from att3d import cli
        cli.COMMANDS["fake"] = cli.Command("att3d_fake_cmd:main", "a fake", "A fake command.")
        sys.exit(cli.main())
    """)
    r = run_cli("fake", "user", code=code)
    assert (r.returncode, r.stderr) == (2, "att3d: error: bad input over two lines\n")
    r = run_cli("fake", "enforce", code=code)
    assert r.returncode == 2 and r.stderr.startswith("att3d: error: a file could not be written") and \
        r.stderr.count("\n") == 1
    r = run_cli("fake", "bug", code=code, env={"ATT3D_DEBUG": "1"})
    assert r.returncode == 1
    assert "Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("att3d: error: internal error")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["trian"], "att3d: error: unknown command 'trian' for 'att3d'; did you mean 'train'?"),
        (["--bogus"], "att3d: error: unrecognized arguments: --bogus (see 'att3d --help')"),
        (["eval"], "att3d: error: 'att3d eval' needs a target: prior, paraphrase, model (see 'att3d eval --help')"),
        (["eval", "xyz"],
         "att3d: error: unknown target 'xyz' for 'att3d eval' (choose from: prior, paraphrase, model)"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, expected):
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == expected + "\n"


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: att3d" in capsys.readouterr().err


def test_import_is_cheap_and_load_is_lazy():
    r = run_cli(code="import sys, att3d, att3d.cli; print('torch' in sys.modules, callable(att3d.load))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_load_of_a_missing_folder_is_a_user_error(tmp_path):
    code = textwrap.dedent(f"""
        import att3d
        try:
            att3d.load({str(tmp_path / "nowhere")!r})
        except att3d.Att3dError as e:
            print(type(e).__name__, e)
    """)
    r = run_cli(code=code)
    assert r.returncode == 0 and "is not an att3d model folder" in r.stdout, r.stderr


def test_command_parser_uses_the_table():
    from att3d.cli._args import CommandParser

    p = CommandParser("eval prior")
    assert p.prog == "att3d eval prior"
    assert p.description == cli.COMMANDS["eval"].subcommands["prior"].description
    p.add_argument("--steps", type=int)
    with pytest.raises(cli.UsageError, match=r"^argument --steps: invalid int value: 'x' \(see 'att3d eval prior "
                                             r"--help'\)$"):
        p.parse_args(["--steps", "x"])


def test_checkpoint_error_is_a_user_error():
    from att3d.utils.checkpoint import CheckpointError

    assert issubclass(CheckpointError, Att3dError) and issubclass(CheckpointError, RuntimeError)


def test_help_of_a_hydra_style_command_prints_the_description_first(fake, capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "fake", cli.Command("att3d_fake_cmd:main", "a fake", "A fake Hydra app.",
                                                          own_help=False))
    assert cli.main(["fake", "ok", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: att3d fake") and "A fake Hydra app." in out
    assert out.rstrip().endswith("fake got ['ok', '--help']")


def test_a_missing_model_folder_is_named(tmp_path, monkeypatch):
    from att3d.utils import paths

    with pytest.raises(Att3dError, match=r"^model not found: no/such/model \(pass --checkpoint PATH"):
        paths.resolve_model_folder("no/such/model")
    (tmp_path / "file").write_text("x")
    with pytest.raises(Att3dError, match="a file, not a folder"):
        paths.resolve_model_folder(tmp_path / "file")
    assert paths.resolve_model_folder(tmp_path) == tmp_path
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)  # a checkout without the shipped model
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Att3dError, match="the shipped model is not in this checkout"):
        paths.resolve_model_folder(paths.DEFAULT_MODEL)
