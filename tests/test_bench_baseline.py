"""``att3d bench generate --baseline REV``: the baseline worktree, the side-by-side summary and table, and one
end-to-end run against the committed HEAD on a tiny model (through a shared clone: the repository is untouched)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from att3d import cli
from att3d.eval import bench
from att3d.eval.bench import BenchError
from tests.test_bench import tiny_model_dir  # noqa: F401 (a fixture of this module's tests too)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@example.com",
                           *args], check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repository with two commits of ``pkg/a.txt`` (``v1``, then ``v2``)."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    git(root, "init", "-q")
    (root / "pkg" / "a.txt").write_text("v1\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "one")
    (root / "pkg" / "a.txt").write_text("v2\n")
    git(root, "commit", "-q", "-am", "two")
    return root


def test_baseline_worktree_checks_out_the_revision_beside_the_checkout(repo):
    first = git(repo, "rev-parse", "HEAD~1")
    path = bench.baseline_worktree(repo / "pkg", "HEAD~1")  # any folder of the checkout
    assert path == (repo / ".cache" / "bench-baseline" / first).resolve()
    assert (path / "pkg" / "a.txt").read_text() == "v1\n"
    assert (repo / "pkg" / "a.txt").read_text() == "v2\n"  # the main worktree is untouched
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") in ("master", "main")
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert bench.baseline_worktree(repo, first[:7]) == path  # reused, whatever names the commit
    assert bench.describe_tree(path) == {"path": str(path), "commit": first, "dirty": False}
    (path / "pkg" / "a.txt").write_text("edited\n")
    with pytest.raises(BenchError, match="has local changes"):
        bench.baseline_worktree(repo, "HEAD~1")


def test_baseline_worktree_errors_are_one_line(repo, tmp_path):
    with pytest.raises(BenchError, match="unknown git revision 'no-such-rev'"):
        bench.baseline_worktree(repo, "no-such-rev")
    with pytest.raises(BenchError, match="unknown git revision"):
        bench.baseline_worktree(repo, "--help")
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(BenchError, match="not in one"):
        bench.baseline_worktree(plain, "HEAD")
    broken = repo / ".cache" / "bench-baseline" / git(repo, "rev-parse", "HEAD")
    broken.mkdir(parents=True)  # an interrupted checkout: a folder that is no worktree
    with pytest.raises(BenchError, match="is not a worktree of"):
        bench.baseline_worktree(repo, "HEAD")


def _round(seconds: dict[int, float], turntable: float, faces: int = 100) -> dict:
    return {"runs": [{"batch_size": b, "seconds": s, "faces": faces, "empty": 0,
                      "stages": {k: s / 10 for k in bench.STAGES}} for b, s in seconds.items()],
            "turntables": [{"render": turntable * 0.8, "video": turntable * 0.2, "seconds": turntable}]}


def test_a_round_times_whole_batches_of_prompts_that_cover_every_shape():
    from att3d.world.shapes import SHAPE_NAMES

    assert [bench.round_prompts(b) for b in (1, 3, 8, 16)] == [8, 9, 8, 16]
    assert bench.round_prompts(2, 1) == 2 and bench.round_prompts(1, 1) == 1
    first = bench.bench_prompts(8)
    assert [p.split()[-1] for p in first] == list(SHAPE_NAMES) and len(set(bench.bench_prompts(64))) == 64
    # a run's seconds per prompt divide by the prompts it timed (default: its batch size)
    runs = [{"seconds": 8.0, "prompts": 8, "stages": {"field": 4.0}, "faces": 10, "empty": 0},
            {"seconds": 2.0, "stages": {"field": 1.0}, "faces": 10, "empty": 0}]
    row = bench.summarize_runs(runs, 1, ["field"])
    assert row["min_seconds_per_prompt"] == 1.0 and row["max_seconds_per_prompt"] == 2.0
    assert row["seconds_per_prompt"] == pytest.approx(1.5) and row["stage_seconds_per_prompt"]["field"] == 0.75
    assert row["prompts_per_round"] == 8


def test_summary_is_medians_and_baseline_over_current():
    rounds = {"current": [_round({1: 1.0, 4: 2.0}, 0.5), _round({1: 3.0, 4: 2.4}, 0.7), _round({1: 2.0, 4: 2.2}, 0.6)],
              "baseline": [_round({1: 4.0, 4: 8.0}, 1.2), _round({1: 4.0, 4: 8.8}, 1.2), _round({1: 5.0, 4: 9.0}, 1.2)]}
    s = bench.summarize_generate(rounds, [1, 4])
    one, four = s["rows"]
    assert one["current"]["seconds_per_prompt"] == pytest.approx(2.0)
    assert one["baseline"]["seconds_per_prompt"] == pytest.approx(4.0)
    assert one["speedup"] == pytest.approx(2.0)
    assert one["paired_speedups"] == pytest.approx([4.0, 4 / 3, 2.5])
    assert four["current"]["seconds_per_prompt"] == pytest.approx(2.2 / 4)  # per prompt
    assert four["speedup"] == pytest.approx(8.8 / 2.2)
    assert four["current"]["stage_seconds_per_prompt"]["field"] == pytest.approx(0.22 / 4)
    assert s["turntable"]["speedup"] == pytest.approx(2.0)
    assert s["turntable"]["current"]["render_seconds_per_prompt"] == pytest.approx(0.48)
    table = bench.side_by_side_markdown(s, turntable_row="+ turntable (48 frames, 256 px)").splitlines()
    assert table[0].startswith("| batch | current s / prompt | baseline s / prompt | speed-up | encode | mapping |")
    assert table[2] == ("| 1 | 2.000 | 4.000 | 2.00x | 0.200 | 0.200 | 0.200 | 0.200 | 0.200 | 0.200 "
                        "| 100 / 100 |")
    assert table[3].startswith("| 4 | 0.550 | 2.200 | 4.00x |")
    assert table[4].startswith("| + turntable (48 frames, 256 px) | 0.600 | 1.200 | 2.00x | - |")
    with pytest.raises(BenchError, match="no current run of batch size 16"):
        bench.summarize_generate(rounds, [16])


def test_generate_against_head_side_by_side(baseline_in_clone, tiny_model_dir, tmp_path, monkeypatch,  # noqa: F811
                                            capsys):
    out = tmp_path / "b.md"
    release = tmp_path / "release-model"  # the baseline's own model (e.g. the previous release's)
    shutil.copytree(tiny_model_dir, release)
    code = cli.main(["bench", "generate", "--baseline", "HEAD", "--checkpoint", str(tiny_model_dir),
                     "--baseline-checkpoint", str(release),
                     "--batch-sizes", "1", "2", "--repeats", "1", "--prompts-per-round", "3", "--warmup", "0",
                     "--resolution", "20",
                     "--texture-size", "32", "--frames", "2", "--turntable-resolution", "32", "--threads", "1",
                     "--device", "cpu", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = out.read_text()
    assert "1 torch threads" in text and "speed-up" in text and "baseline: HEAD = " in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "2", "+ turntable (2 frames, 32 px)"]
    data = json.loads(out.with_suffix(".json").read_text())["benchmarks"]["generate"]
    v = data["settings"]["versions"]
    assert v["baseline"]["commit"] == v["current"]["commit"] and v["baseline"]["dirty"] is False
    assert Path(v["baseline"]["path"]).is_relative_to(baseline_in_clone)
    assert data["settings"]["worker_threads"] == [1]
    assert [r["round"] for r in data["rounds"]["current"]] == [0]
    assert data["rounds"]["baseline"][0]["att3d_file"].startswith(v["baseline"]["path"])
    assert data["rounds"]["current"][0]["att3d_file"].startswith(str(bench.package_tree()))
    assert data["rounds"]["current"][0]["model"] == str(Path(tiny_model_dir).resolve())
    assert data["rounds"]["baseline"][0]["model"] == data["settings"]["baseline_checkpoint"] == str(release.resolve())
    assert f"(baseline: {release.resolve()})" in text
    for r in data["rows"]:
        assert r["speedup"] > 0 and r["current"]["seconds_per_prompt"] > 0 and r["baseline"]["faces_per_mesh"] > 0
    for version in ("current", "baseline"):  # three prompts at batch 1, two whole batches of two at batch 2
        assert [run["prompts"] for run in data["rounds"][version][0]["runs"]] == [3, 4]
    assert data["settings"]["prompts_per_round"] == 3
    assert data["turntable"]["speedup"] > 0


@pytest.mark.parametrize("args, message", [
    (["train", "--baseline", "HEAD"], "--baseline is for generate and scale"),
    (["generate", "--baseline", "HEAD", "--format", "obj"], "--baseline times GLB files"),
    (["generate", "--baseline-checkpoint", "m"], "--baseline-checkpoint needs --baseline REV"),
    (["generate", "--threads", "0"], "--threads must be >= 1"),
    (["generate", "--frames", "0"], "--frames must be >= 1"),
    (["scale", "--prompt-counts", "0"], "--prompt-counts must be >= 1"),
])
def test_bench_baseline_errors_are_one_line(args, message, capsys):
    code = cli.main(["bench", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("att3d: error: ") and message in err and err.count("\n") == 1


def test_unknown_revision_is_one_line(tiny_model_dir, capsys):  # noqa: F811
    try:
        bench.repo_root()
    except BenchError:
        pytest.skip("att3d is not run from a git checkout")
    code = cli.main(["bench", "generate", "--baseline", "no-such-revision-xyz", "--checkpoint", str(tiny_model_dir),
                     "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown git revision 'no-such-revision-xyz'" in err and err.count("\n") == 1
