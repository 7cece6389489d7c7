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
