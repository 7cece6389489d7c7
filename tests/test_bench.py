"""``att3d bench``: generation latency and training throughput reports on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from att3d import cli
from att3d.eval import bench
from att3d.model import AmortizedModel

TINY = {
    "text_encoder": {"name": "minilm", "max_length": 8},
    "mapping": {"name": "hypernetwork", "hidden_dim": 8},
    "field": {"name": "grid", "num_levels": 2, "base_resolution": 4, "max_resolution": 8, "hidden_dim": 8},
    "renderer": {"name": "volume", "num_samples": 8, "backend": "torch"},
    "extraction": {"threshold": 2.0},
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model folder (:data:`TINY`), shared by the bench tests (tests/test_bench_baseline.py too)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bench-model")
    AmortizedModel(TINY).save_pretrained(folder)
    return folder


def test_bench_generate_writes_its_table(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "results.md"
    code = cli.main(["bench", "generate", "--checkpoint", str(tiny_model_dir), "--batch-sizes", "1", "3",
                     "--repeats", "1", "--prompts-per-round", "2", "--warmup", "0", "--resolution", "20",
                     "--texture-size", "32",
                     "--frames", "2", "--turntable-resolution", "32", "--device", "cpu", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    text = out.read_text()
    assert text in captured.out
    assert "Machine: " in text and "device cpu" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| batch | s / prompt | prompts / s | encode | mapping | field | extraction |")
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["1", "3", "+ turntable (2 frames, 32 px)"]
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["machine"]["cpu_cores"] >= 1 and data["machine"]["device"] == "cpu"
    res = data["benchmarks"]["generate"]["rows"]
    assert [r["batch_size"] for r in res] == [1, 3]
    assert [r["prompts_per_round"] for r in res] == [2, 3]  # two prompts, or one whole batch of three
    assert "a run times 2 prompts or more, in whole batches: a red sphere, a red cube, ..." in text
    for r in res:
        assert r["seconds_per_prompt"] > 0 and r["empty_meshes"] == 0 and r["faces_per_mesh"] > 0
        stages = r["stage_seconds_per_prompt"]
        assert all(stages[k] > 0 for k in ("encode", "field", "extraction", "texture", "export"))
        if r["batch_size"] == 1:  # a batch's meshes may overlap in threads: their stages add up to more than it
            assert sum(stages.values()) <= r["seconds_per_prompt"] * 1.01
    tt = data["benchmarks"]["generate"]["turntable"]
    assert tt["count"] == 1 and tt["seconds_per_prompt"] >= tt["render_seconds_per_prompt"] > 0


def test_bench_train_reports_throughput(tmp_path, capsys):
    out = tmp_path / "train.md"
    code = cli.main(["bench", "train", "--steps", "1", "--warmup", "0", "--train-batch-size", "1",
                     "--train-resolution", "8", "--prior", "tiny", "--device", "cpu", "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(out.with_suffix(".json").read_text())
    row, nerfacc_row = data["benchmarks"]["train"]["rows"]
    assert row["backend"] == "torch" and row["steps_per_second"] > 0
    if not torch.cuda.is_available():  # the nerfacc path is listed, as skipped, not silently dropped
        assert nerfacc_row == {"backend": "cuda", "skipped": "needs CUDA and nerfacc"}
        assert "skipped: needs CUDA and nerfacc" in out.read_text()
    assert row["rays_per_second"] == pytest.approx(64 * row["steps_per_second"])
    assert row["peak_memory_mb"] > 10
    assert "tiny random shapes prior" in out.read_text()
    assert "Current tree only" not in out.read_text()


def test_bench_train_says_that_it_has_no_baseline():
    # `bench all --baseline REV` compares generate side by side, not train: the train section says so.
    from att3d.cli.bench import build_parser

    args = build_parser().parse_args(["all", "--steps", "1", "--warmup", "0", "--train-batch-size", "1",
                                      "--train-resolution", "8", "--prior", "tiny", "--quiet", "--baseline", "HEAD"])
    text = bench.bench_train(args, torch.device("cpu"))["markdown"]
    assert "Current tree only: `--baseline HEAD` times the baseline for generate and scale" in text


@pytest.mark.parametrize("args, message", [
    (["nothing"], "unknown benchmark 'nothing'"),
    (["generate", "--repeats", "0"], "--repeats must be >= 1"),
    (["generate", "--format", "fbx"], "unknown format 'fbx'"),
    (["generate", "--checkpoint", "no/such/model", "--device", "cpu"], "model not found: no/such/model"),
])
def test_bench_errors_are_one_line(args, message, capsys):
    code = cli.main(["bench", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("att3d: error: ") and message in err and err.count("\n") == 1


def test_markdown_table():
    text = bench.markdown(["a", "b"], [["x", "1"], ["y", "22"]])
    assert text.splitlines() == ["| a | b |", "|:---|---:|", "| x | 1 |", "| y | 22 |"]
