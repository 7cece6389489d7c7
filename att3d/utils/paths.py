"""Where att3d finds its own files: the source checkout, its Hydra configs and shipped assets.

One home for the repository root (``REPO_ROOT``), the configs folder (``ATT3D_CONFIGS`` overrides it), the
shipped default model and the lookup of a user path that may name a shipped asset.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The source checkout (the folder holding ``att3d/``, ``configs/`` and ``assets/``).
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The model folder that ``generate``, ``interpolate``, ``refine`` and the evaluations use by default.
DEFAULT_MODEL = "assets/att3d-shapes64"
#: Environment variable naming another folder of Hydra configs.
CONFIGS_ENV = "ATT3D_CONFIGS"


def configs_dir() -> Path:
    """The folder of Hydra configs (``$ATT3D_CONFIGS`` overrides the repository's ``configs/``)."""
    return Path(os.environ.get(CONFIGS_ENV, REPO_ROOT / "configs"))


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root (shipped assets);
    a path found in neither place comes back as given."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    q = REPO_ROOT / p
    return q if q.exists() else p


def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A model folder found by :func:`resolve_path` (as given, else relative to the repository root).

    Raises:
        Att3dError: no folder there (one line naming the path; for :data:`DEFAULT_MODEL`, a hint that the
            shipped model is missing from this checkout).
    """
    from att3d.utils.errors import Att3dError

    folder = resolve_path(path)
    if folder.is_dir():
        return folder
    if Path(path) == Path(DEFAULT_MODEL):
        hint = "the shipped model is not in this checkout; train one with 'att3d train'"
    elif folder.exists():
        hint = "it is a file, not a folder; pass --checkpoint PATH to a model folder"
    else:
        hint = "pass --checkpoint PATH to a model folder"
    raise Att3dError(f"model not found: {path} ({hint})")
