"""Shared test set-up (keep it small; fixtures of one area belong in that area's test files)."""

import os

# Tests never reach the model hubs: fail at once instead of waiting on the network. Headless plots.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# diffusers and transformers bind their default log handler to whatever sys.stderr is when their logging is
# first configured; do it now, at session start, so that it is never a test's (later closed) capture stream.
import diffusers.utils.logging  # noqa: E402
import transformers.utils.logging  # noqa: E402

diffusers.utils.logging.get_verbosity()
transformers.utils.logging.get_verbosity()


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_prior_dir(tmp_path_factory):
    """A tiny, randomly initialised shapes prior folder (prior_config.json, unet/, scheduler/), built once."""
    from att3d.world.prior_training import PriorArchitecture, build_scheduler, build_unet, save_prior

    arch = PriorArchitecture(block_out_channels=(16, 32), attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-prior")
    save_prior(folder, build_unet(arch), build_scheduler(arch), arch)
    return folder


@pytest.fixture
def baseline_in_clone(tmp_path, monkeypatch):
    """``att3d bench --baseline`` worktrees go into a shared clone of this checkout, which stays untouched."""
    import subprocess

    from att3d.eval import bench

    try:
        root = bench.repo_root()
    except bench.BenchError:
        pytest.skip("att3d is not run from a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(root), str(clone)], check=True)
    real = bench.baseline_worktree
    monkeypatch.setattr(bench, "baseline_worktree", lambda repo, rev: real(clone, rev))
    return clone
