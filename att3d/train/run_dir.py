"""Run folders: ``runs/<name>/<timestamp>/`` for a new run, the given folder for ``resume=``.

Under ``torchrun`` all ranks share one timestamp (``ATT3D_RUN_STAMP``, set by the ``att3d train`` command after
the process group is joined), so that they agree on the folder.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

#: Environment variable holding the run folder's timestamp that all ranks of a torchrun job share.
STAMP_ENV = "ATT3D_RUN_STAMP"


def stamp() -> str:
    """The current time as a run folder name (``2026-12-01_09-30-00``)."""
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_dir_for(resume: str | None, name: str) -> str:
    """The run folder of a run named ``name``: ``resume`` when given, else ``runs/<name>/<timestamp>``
    (the OmegaConf resolver ``att3d_run_dir`` of ``configs/train.yaml``)."""
    if resume not in (None, "", "None", "null"):
        return str(resume)
    return str(Path("runs") / str(name) / (os.environ.get(STAMP_ENV) or stamp()))


def save_config(cfg: dict, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    from omegaconf import OmegaConf

    from att3d.utils.checkpoint import atomic_write

    path = Path(run_dir) / "config.yaml"
    text = OmegaConf.to_yaml(OmegaConf.create(cfg))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path
