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
