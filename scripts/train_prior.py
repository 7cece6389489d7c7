"""Train the shapes-world diffusion prior (Hydra app over configs/prior.yaml); resumable.

    python scripts/train_prior.py max_steps=4000 out_dir=runs/prior
    python scripts/train_prior.py export_only=true out_dir=runs/prior   # export the latest checkpoint
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from att3d.world.prior_training import PriorArchitecture, PriorTrainingConfig, export_checkpoint, train_prior

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(version_base=None, config_path=CONFIGS, config_name="prior")
def main(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    if raw.pop("export_only", False):
        print(export_checkpoint(raw["out_dir"]))
        return
    arch = PriorArchitecture(**{**raw.pop("arch"), })
    arch.block_out_channels = tuple(arch.block_out_channels)
    try:
        folder = train_prior(PriorTrainingConfig(arch=arch, **raw))
    except ValueError as e:  # bad input (e.g. init_from): one line, exit code 2
        print(f"train_prior: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.getLogger(__name__).info("exported prior to %s", folder)
    print(folder)


if __name__ == "__main__":
    main()
