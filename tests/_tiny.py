"""Shared test helpers: the tiny amortized-model config and loading a script of scripts/ as a module."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

_TINY_CONFIG: dict[str, Any] = {
    "text_encoder": {"name": "minilm", "max_length": 16},
    "mapping": {"name": "hypernetwork", "hidden_dim": 8},
    "field": {"name": "grid", "num_levels": 2, "base_resolution": 4, "max_resolution": 8, "hidden_dim": 8},
    "renderer": {"name": "volume", "backend": "torch", "num_samples": 8, "region": "box"},
}


def tiny_config(num_samples: int = 8) -> dict[str, Any]:
    """A fresh copy of the smallest amortized-model config (MiniLM, 2-level 8^3 grid, 8-wide MLP)."""
    cfg = copy.deepcopy(_TINY_CONFIG)
    cfg["renderer"]["num_samples"] = num_samples
    return cfg


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
