"""``att3d train``: the Hydra application over ``configs/train.yaml``.

Each run gets its own folder (``runs/<name>/<timestamp>/``) holding the resolved
config (``config.yaml``), Hydra's record (``.hydra/``), logs, TensorBoard events,
``metrics.jsonl``, checkpoints and the final model folder (``model/``).
``resume=<run folder>`` continues a run from its latest checkpoint with its saved
config; command-line overrides apply on top (e.g. a larger ``trainer.max_steps``).
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def configs_dir() -> Path:
    """The folder of Hydra configs (``ATT3D_CONFIGS`` overrides the repository's ``configs/``)."""
    return Path(os.environ.get("ATT3D_CONFIGS", REPO_ROOT / "configs"))


def resolve_path(path: str | os.PathLike) -> Path:
    """A path as given if it exists (or is absolute), else relative to the repository root (for shipped assets)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    q = REPO_ROOT / p
    return q if q.exists() else p


def _run_dir(resume: str | None, name: str) -> str:
    if resume not in (None, "", "None", "null"):
        return str(resume)
    return str(Path("runs") / str(name) / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("att3d_run_dir"):
        OmegaConf.register_new_resolver("att3d_run_dir", _run_dir)


def build_guidance(gcfg: dict[str, Any], device: str):
    """The ScoreDistillation object of a ``guidance`` config group."""
    from att3d.guidance.sds import ScoreDistillation
    from att3d.registry import PRIORS

    gcfg = dict(gcfg)
    prior_cfg = dict(gcfg.pop("prior"))
    gcfg.pop("background", None)
    name = prior_cfg.pop("name")
    path = prior_cfg.pop("path")
    local = resolve_path(path)
    prior = PRIORS.get(name).from_pretrained(str(local) if local.exists() else path, device=device, **prior_cfg)
    if gcfg.get("t_range") is not None:
        gcfg["t_range"] = tuple(gcfg["t_range"])
    if gcfg.get("t_anneal") is not None:
        gcfg["t_anneal"] = tuple(gcfg["t_anneal"])
    return ScoreDistillation(prior, **gcfg)


def model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(cfg[k]) for k in ("text_encoder", "mapping", "field", "renderer")}


def build_trainer(cfg: dict[str, Any], run_dir: str | Path):
    """Model, prompt bank, guidance and trainer of a resolved train config (a plain dict)."""
    from att3d.model import AmortizedModel
    from att3d.text.prompts import PromptBank, resolve_prompts
    from att3d.train.trainer import Trainer, pick_device, trainer_config_from_dict

    tcfg = trainer_config_from_dict(cfg["trainer"])
    device = pick_device(tcfg.device)
    prompts = PromptBank(resolve_prompts(cfg["prompts"]["train"], base_dir=configs_dir() / "prompts"))
    model = AmortizedModel(model_config(cfg))
    guidance = build_guidance(cfg["guidance"], str(device))
    background = tuple(cfg["guidance"].get("background") or (1.0, 1.0, 1.0))
    cache = cfg.get("embedding_cache")
    return Trainer(model, prompts, guidance, tcfg, run_dir, background=background,
                   embedding_cache=resolve_path(cache) if cache else None, progress=bool(cfg.get("progress", True)))


def run(cfg: dict[str, Any], run_dir: str | Path) -> Path:
    """Train with a resolved config dict; returns the final model folder."""
    trainer = build_trainer(cfg, run_dir)
    return trainer.fit(resume=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``att3d train [overrides...]``; returns the exit code."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    _register_resolvers()
    argv = list(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"code": 0}

    @hydra.main(version_base=None, config_path=str(configs_dir()), config_name="train")
    def _app(cfg: DictConfig) -> None:
        run_dir = Path(cfg.run_dir)
        try:
            saved = run_dir / "config.yaml"
            if cfg.resume and saved.is_file():
                overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
                base = OmegaConf.load(saved)
                cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
                cfg.resume = str(run_dir)
            elif cfg.resume:
                raise Att3dError(f"resume: {run_dir} is not an att3d run folder (no config.yaml)")
            run_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
            folder = run(OmegaConf.to_container(cfg, resolve=True), run_dir)
            print(f"model written to {folder}")
        except Att3dError as e:
            print(f"att3d: error: {e}", file=sys.stderr)
            result["code"] = 2
        except KeyboardInterrupt:
            print("att3d: interrupted", file=sys.stderr)
            result["code"] = 130

    old = sys.argv
    sys.argv = ["att3d train", *argv]
    try:
        _app()
    except SystemExit as e:  # Hydra exits on bad overrides / --help after printing its message
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code
    finally:
        sys.argv = old
    return int(result["code"])
