"""Atomic, pickle-free checkpoint files."""

from __future__ import annotations

import pytest
import torch

from att3d.utils.checkpoint import (
    CheckpointError,
    atomic_write,
    load_json,
    load_state,
    load_tensors,
    save_json,
    save_report,
    save_state,
    save_tensors,
)
from att3d.utils.errors import Att3dError


def test_tensor_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "x.safetensors", t)
    back = load_tensors(tmp_path / "x.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_truncated_file_names_the_file(tmp_path):
    p = tmp_path / "x.safetensors"
    save_tensors(p, {"a": torch.randn(100)})
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="x.safetensors"):
        load_tensors(p)


def test_failed_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "meta.json"
    save_json(p, {"step": 1})

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("{half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(p, broken)
    assert load_json(p) == {"step": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_optimizer_state_loads_without_pickled_code(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    save_state(tmp_path / "opt.pt", opt.state_dict())
    state = load_state(tmp_path / "opt.pt")
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters())
    opt2.load_state_dict(state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_state(tmp_path / "evil.pt")


# -- a full disk, a file size limit (issue 19, item 4): real file systems ---------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (needs root with CAP_SYS_ADMIN, as in CI)."""
    import subprocess

    where = tmp_path / "fs"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.fail(f"this test mounts a tmpfs (as in CI, as root): {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


BIG = {"exp_avg": torch.zeros(200_000)}  # 800 kB: more than the file system holds


def test_torch_save_on_a_full_disk_is_translated(small_fs):
    from att3d.utils.checkpoint import WriteError

    with pytest.raises(RuntimeError, match=r"inline_container\.cc.*unexpected pos"):  # what torch itself says
        torch.save(BIG, small_fs / "raw.pt")
    (small_fs / "raw.pt").unlink(missing_ok=True)
    target = small_fs / "optimizer.pt"
    save_state(target, {"step": 1})
    old = target.read_bytes()
    with pytest.raises(WriteError) as e:
        save_state(target, BIG)
    assert str(e.value) == (f"cannot write {target}: No space left on device (ENOSPC; free some space or write "
                            "elsewhere)")
    assert isinstance(e.value, OSError) and e.value.errno == 28 and isinstance(e.value, Att3dError)
    assert target.read_bytes() == old and sorted(p.name for p in small_fs.iterdir()) == ["optimizer.pt"]
    with pytest.raises(WriteError, match=f"^cannot write {small_fs}/w.safetensors: No space left on device"):
        save_tensors(small_fs / "w.safetensors", {"w": torch.zeros(200_000)})
    assert sorted(p.name for p in small_fs.iterdir()) == ["optimizer.pt"]


def test_a_file_size_limit_is_named(tmp_path):
    """``ulimit -f`` in a child process: EFBIG for torch.save, safetensors and plain writes alike."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import resource, sys, torch
        from att3d.utils.checkpoint import save_json, save_state, save_tensors
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        for name, save in (("a.pt", lambda p: save_state(p, {{"x": torch.zeros(100_000)}})),
                           ("b.safetensors", lambda p: save_tensors(p, {{"x": torch.zeros(100_000)}})),
                           ("c.json", lambda p: save_json(p, list(range(100_000))))):
            try:
                save({str(tmp_path)!r} + "/" + name)
            except OSError as e:
                print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cause = "File too large (EFBIG; a file size limit (ulimit -f) or the file system's maximum file size was reached)"
    assert r.stdout.splitlines() == [f"cannot write {tmp_path}/{n}: {cause}" for n in ("a.pt", "b.safetensors",
                                                                                      "c.json")]
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_atomic_folder_is_all_or_nothing(tmp_path):
    from att3d.utils.checkpoint import atomic_folder

    dest = tmp_path / "step-0000002"
    with atomic_folder(dest) as tmp:
        save_json(tmp / "a.json", {"v": 1})
        assert not dest.exists()  # not there until complete
    assert load_json(dest / "a.json") == {"v": 1}
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_folder(dest) as tmp:
            save_json(tmp / "a.json", {"v": 2})
            raise RuntimeError("crash mid-folder")
    assert load_json(dest / "a.json") == {"v": 1} and sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    with atomic_folder(dest) as tmp:
        save_json(tmp / "b.json", {"v": 3})
    assert sorted(p.name for p in dest.iterdir()) == ["b.json"]  # replaced as a whole
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write .*/file: a file is in the way"):
        with atomic_folder(tmp_path / "file"):
            pass


def test_save_report_writes_json_and_markdown_in_a_new_folder(tmp_path):
    folder = save_report(tmp_path / "a" / "b", "pull", {"rows": [1, 2]}, "# title\n")
    assert folder == tmp_path / "a" / "b"
    assert load_json(folder / "pull.json") == {"rows": [1, 2]}
    assert (folder / "pull.md").read_text() == "# title\n"
    assert sorted(p.name for p in folder.iterdir()) == ["pull.json", "pull.md"]  # no temporaries left
    (tmp_path / "file").write_text("x")
    with pytest.raises(Att3dError):
        save_report(tmp_path / "file", "pull", {}, "")
