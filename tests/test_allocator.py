"""att3d.utils.allocator: glibc keeps freed blocks for reuse (no page faults on the next large tensor), the trainer
applies it on the CPU unless told not to, and training computes the same weights either way.

Each check runs in a fresh Python process: the setting is process-wide and lasting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from att3d.utils.allocator import _glibc

REPO = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(_glibc() is None, reason="the C library is not glibc: nothing is changed there")


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (one torch thread); it prints one JSON object last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


FAULTS = """
import json, resource, torch
from att3d.utils import allocator
applied = allocator.keep_freed_memory() if {keep} else False
def faults_of_a_fresh_48mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(12 * 2**20)  # 48 MB (a training step's ray samples are such), written everywhere
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    del x
    return after - before
# torch asks for 64-byte aligned blocks, which glibc serves from a slightly larger free block: the heap grows for a
# few rounds before the freed blocks coalesce enough to serve every request
faults = [faults_of_a_fresh_48mb_tensor() for _ in range(16)][-4:]
print(json.dumps({{"applied": applied, "again": allocator.keep_freed_memory() if {keep} else False,
                  "kept": allocator.keeps_freed_memory(), "faults": faults}}))
"""


@needs_glibc
def test_freed_large_blocks_are_reused_without_page_faults():
    kept = run_python(FAULTS.format(keep=True))
    assert kept["applied"] and kept["again"] and kept["kept"]
    pages = 48 * 2**20 // 4096
    assert max(kept["faults"]) < pages // 100, kept  # the 48 MB come back from the heap, already mapped
    default = run_python(FAULTS.format(keep=False))
    assert not default["kept"]
    # glibc's default maps each one afresh and faults it in again, page by page
    assert min(default["faults"]) > pages // 2, (default, kept)


TRAIN = """
import json, sys, torch
sys.path.insert(0, "tests")
from test_trainer import make_trainer
from pathlib import Path
from att3d.utils import allocator
t = make_trainer(Path({prior!r}), Path({prompts!r}), Path({run!r}), trainer__keep_freed_memory="{keep}")
losses = [t.train_step()["loss"] for _ in range(3)]
w = {{k: float(v.double().sum()) for k, v in t.model.state_dict().items()}}
print(json.dumps({{"kept": allocator.keeps_freed_memory(), "losses": losses, "weights": w}}))
"""


@needs_glibc
def test_trainer_keeps_freed_memory_on_the_cpu_and_trains_the_same(tiny_prior_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\na green torus\na yellow cone\n")
    runs = {keep: run_python(TRAIN.format(prior=str(tiny_prior_dir), prompts=str(prompts),
                                          run=str(tmp_path / f"run-{keep}"), keep=keep))
            for keep in ("true", "false")}
    assert runs["true"]["kept"] and not runs["false"]["kept"]
    assert runs["true"]["losses"] == runs["false"]["losses"]
    assert runs["true"]["weights"] == runs["false"]["weights"]
