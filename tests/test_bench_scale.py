"""``att3d bench scale``: training on N prompts in fresh processes (start-up cold then warm, step time, RSS)."""

from __future__ import annotations

import json

import pytest

from att3d import cli
from att3d.eval import bench


def test_bench_prompts_are_distinct_and_nested():
    prompts = bench.bench_prompts(300)
    assert len(set(prompts)) == 300 and prompts[:64] == bench.bench_prompts(64)
    assert prompts[64].endswith(" number 1")


def test_scale_prompts_are_distinct_captions_first():
    prompts, source = bench.scale_prompts(7000)
    assert len(set(prompts)) == 7000 and prompts[:64] == bench.bench_prompts(64) and "captions" in source
    assert bench.scale_prompts(10)[0] == prompts[:10]


def _run(n: int, startup: float, step: float, rss: float, cold: bool) -> dict:
    return {"cold": cold, "startup_seconds": startup, "step_seconds": [step, step * 3, step], "spawned": 0.0,
            "imported": 1.0, "build_seconds": 2.0, "step1_seconds": 0.5,
            "memory": {"VmRSS": rss, "VmHWM": rss + 1, "RssAnon": rss / 2}}


def test_summary_reports_cold_only_when_the_cache_was_cold():
    rows = bench.summarize_scale({
        1000: [_run(1000, 30.0, 0.2, 600.0, True), _run(1000, 10.0, 0.25, 500.0, False)],
        100: [_run(100, 9.0, 0.2, 410.0, False)],
    })
    small, big = rows
    assert small["prompts"] == 100 and small["startup_cold_seconds"] is None and small["startup_warm_seconds"] == 9.0
    assert small["rss_growth_per_1k_mb"] is None and small["step_ratio"] == pytest.approx(1.0)
    assert big["startup_cold_seconds"] == 30.0 and big["startup_warm_seconds"] == 10.0
    assert big["seconds_per_step"] == pytest.approx(0.25)  # the warm run's median
    assert big["step_ratio"] == pytest.approx(1.25)
    assert big["rss_mb"] == 500.0 and big["rss_growth_per_1k_mb"] == pytest.approx(90 / 900 * 1000)
    assert big["startup_phases"] == {"interpreter_and_imports": 1.0, "build_trainer": 2.0, "step1": 0.5}
    lines = bench.scale_markdown(rows).splitlines()
    assert lines[0] == ("| prompts | start-up cold (s) | start-up warm (s) | s / step | step time vs smallest | "
                        "RSS (MB) | RSS growth per 1k prompts (MB) |")
    assert lines[2] == "| 100 | - | 9.0 | 0.200 | 1.00x | 410 | - |"
    assert lines[3] == "| 1000 | 30.0 | 10.0 | 0.250 | 1.25x | 500 | 100.0 |"


def test_bench_scale_end_to_end(tmp_path, capsys):
    cache = tmp_path / "cache"
    out = tmp_path / "scale.md"
    common = ["bench", "scale", "--steps", "1", "--train-batch-size", "1", "--train-resolution", "8",
              "--embedding-cache", str(cache), "--threads", "1", "--device", "cpu", "--quiet"]
    code = cli.main([*common, "--prompt-counts", "8", "16", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = out.read_text()
    assert "| prompts | start-up cold (s) | start-up warm (s) |" in text and "tiny random shapes prior" in text
    data = json.loads(out.with_suffix(".json").read_text())["benchmarks"]["scale"]
    rows = data["rows"]
    assert [r["prompts"] for r in rows] == [8, 16]
    for r in rows:  # a fresh cache: cold, then warm
        assert r["startup_cold_seconds"] > 0 and r["startup_warm_seconds"] > 0 and r["seconds_per_step"] > 0
        assert r["rss_mb"] > 50 and r["step_ratio"] > 0
    assert rows[1]["rss_growth_per_1k_mb"] is not None
    runs = data["runs"]["current"]
    assert [len(runs[k]) for k in ("8", "16")] == [2, 2]
    assert runs["8"][0]["cold"] and runs["8"][0]["new_shards"] and not runs["8"][1]["cold"]
    assert runs["16"][1]["prompts"] == 16 and runs["16"][1]["torch_threads"] == 1
    assert (cache / "n8").is_dir() and (cache / "n16").is_dir()


def test_bench_scale_baseline_runs_warm_after_the_current(baseline_in_clone, tmp_path, monkeypatch, capsys):
    out = tmp_path / "scale.md"
    code = cli.main(["bench", "scale", "--prompt-counts", "8", "--baseline", "HEAD", "--steps", "1",
                     "--train-batch-size", "1", "--train-resolution", "8", "--embedding-cache", str(tmp_path / "c"),
                     "--threads", "1", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.with_suffix(".json").read_text())["benchmarks"]["scale"]
    (row,) = data["rows"]
    assert row["startup_cold_seconds"] > 0 and row["startup_warm_seconds"] > 0
    (base,) = data["baseline_rows"]  # the current filled the cache: one warm run
    assert base["prompts"] == 8 and base["seconds_per_step"] > 0 and base["startup_cold_seconds"] is None
    assert len(data["runs"]["baseline"]["8"]) == 1
    assert data["runs"]["baseline"]["8"][0]["att3d_file"].startswith(str(baseline_in_clone))
    assert data["settings"]["versions"]["baseline"]["revision"] == "HEAD"
    assert "| baseline start-up warm (s) | baseline s / step | step speed-up | baseline RSS (MB) |" in out.read_text()
