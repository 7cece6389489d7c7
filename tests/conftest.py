"""Shared test set-up (keep it small; fixtures of one area belong in that area's test files)."""

import os

# Tests never reach the model hubs: fail at once instead of waiting on the network. Headless plots.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
