"""scripts/device_check.sh on the CPU (issue 21): every GPU part is skipped with one line, the CPU smoke rows run.

The GPU figures themselves need the device machine; here the script must finish, write its JSON and Markdown,
and run the code of each part that can run on a CPU (``--quick``: the torch renderer standing in for nerfacc,
generation at a tiny size, the SDS step on a tiny UNet/VAE config).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"
CACHE = REPO / "scripts" / "device_check_embeddings.safetensors"
NO_CUDA = "no CUDA device"

# The GPU rows of the table, by part: each is reported as skipped without CUDA.
GPU_ROWS = {
    "renderer": 4,  # image difference, torch and nerfacc steps/s, speed-up
    "generate": 1,  # latency at batch 16
    "sds": 4,  # SD 2.1-base and 768-v, fp32 and fp16
    "cuda_tests": 1,
    "nccl": 1,
}


def load_module():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "scripts" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DEVICE_CHECK_INSTALL": "0",
           "DEVICE_CHECK_BUDGET": "300"}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--threads", "1", "--text", "cache"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run, where every GPU part is skipped")
def test_cpu_run_skips_gpu_parts_and_writes_results(cpu_run):
    proc, out = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "device_check.json").read_text())
    rows = data["rows"]
    assert not [r for r in rows if r["status"] == "error"], rows
    assert data["machine"]["gpu"] is None and data["machine"]["mode"] == "quick"

    # Every GPU part: skipped, for the one reason, announced in one line of its own.
    skipped = [r for r in rows if r["status"] == "skipped"]
    counts = {part: sum(r["part"] == part for r in skipped) for part in GPU_ROWS}
    assert counts == GPU_ROWS
    lines = proc.stdout.splitlines()
    for r in skipped:
        assert r["reason"] == NO_CUDA
        assert f"[{r['part']}] {r['name']}: skipped: {NO_CUDA}" in lines

    # The CPU smoke rows ran the parts' code and measured finite, positive numbers.
    smoke = {r["part"]: r for r in rows if r["status"] == "cpu-smoke" and r["unit"] in ("steps/s", "ms/prompt",
                                                                                           "s/step")}
    assert set(smoke) == {"renderer", "generate", "sds"}
    for r in smoke.values():
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    diff = next(r for r in rows if r["part"] == "renderer" and r["status"] == "cpu-smoke" and r["unit"] == "")
    assert diff["value"] == pytest.approx(0.0, abs=1e-6)  # torch against itself on the same field and cameras

    # The Markdown table: one line per row (the environment row is the header's), with the goals.
    md = (out / "gpu.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith(("| part", "| ---"))]
    assert len(table) == len(rows) - 1
    assert "none (no CUDA device" in md
    assert "<= 50 ms/prompt" in md and ">= 5x" in md
    assert (out / "device_check.log").read_text().count(f"skipped: {NO_CUDA}") >= sum(GPU_ROWS.values())


def test_embedding_cache_is_small_and_exact():
    """The committed cache holds MiniLM's embeddings of the 64 captions exactly (padding restored)."""
    assert CACHE.stat().st_size < 2**20
    dc = load_module()
    cached = dc.CachedTextEncoder(CACHE, max_length=16)
    from att3d.world.shapes import all_captions

    assert cached.prompts == all_captions()
    prompts = ["a red sphere", "a gray octahedron", "a orange cube"]
    from att3d.registry import TEXT_ENCODERS

    ref = TEXT_ENCODERS.build("minilm", max_length=16)(prompts)
    got = cached(prompts)
    assert got.tokens.shape == ref.tokens.shape and torch.equal(got.mask, ref.mask)
    torch.testing.assert_close(got.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, ref.pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cached(["a red teapot"])
