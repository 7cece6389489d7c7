"""The amortized text-to-3D model: text encoder -> mapping network -> neural field.

One model serves every prompt: ``model.conditioning(prompts)`` runs the frozen text
encoder and the mapping network to produce each prompt's field conditioning (for
ATT3D's hypernetwork: the values of the field's feature grids), and the shared
field turns points into density and colour. A saved model is a diffusers-style
folder::

    model_config.json        # text_encoder / mapping / field / renderer configs
    model.safetensors        # mapping + field weights (the text encoder is not copied)
    README.md                # model card (for shipped models)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from att3d.registry import FIELDS, MAPPINGS, RENDERERS, TEXT_ENCODERS
from att3d.text.encoders import TextEmbedding
from att3d.utils.checkpoint import CheckpointError, load_json, load_tensors, save_json, save_tensors

CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "model.safetensors"


def _split(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    cfg = dict(cfg)
    return cfg.pop("name"), cfg


class AmortizedModel(torch.nn.Module):
    """Text encoder (frozen) + mapping network + field, built from plain config dicts.

    Args:
        config: ``{"text_encoder": {"name": ..., ...}, "mapping": {...}, "field": {...}, "renderer": {...}}``;
            each part names a registered component and gives its keyword arguments.
        text_encoder: an already built encoder to reuse (optional).
    """

    def __init__(self, config: dict[str, Any], text_encoder: torch.nn.Module | None = None):
        super().__init__()
        self.config = {k: dict(v) for k, v in config.items()}
        name, kw = _split(self.config["text_encoder"])
        # The text encoder is frozen and shared; keep it out of state_dict and parameters().
        object.__setattr__(self, "text_encoder", text_encoder or TEXT_ENCODERS.build(name, **kw))
        self.text_len = int(self.text_encoder.max_length)
        self.text_dim = int(self.text_encoder.dim)
        name, kw = _split(self.config["field"])
        self.field = FIELDS.build(name, **kw)
        name, kw = _split(self.config["mapping"])
        self.mapping = MAPPINGS.build(name, text_len=self.text_len, text_dim=self.text_dim,
                                      out_shapes=self.field.conditioning_shapes(), **kw)
        name, kw = _split(self.config.get("renderer", {"name": "volume"}))
        self.renderer = RENDERERS.build(name, **kw)
        self.config.setdefault("extraction", {"threshold": 5.0})

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def to(self, *args, **kwargs):  # noqa: D102 - keeps the frozen encoder on the same device
        out = super().to(*args, **kwargs)
        self.text_encoder.to(*args, **kwargs)
        return out

    def embed(self, prompts: Sequence[str]) -> TextEmbedding:
        """Embed prompts with the frozen text encoder: -> TextEmbedding (B, L, D)."""
        return self.text_encoder(list(prompts)).to(self.device)

    def conditioning(self, prompts_or_embedding: Sequence[str] | TextEmbedding) -> dict[str, torch.Tensor]:
        """Per-prompt field conditioning from prompts or embeddings: dict of (B, ...) tensors."""
        emb = prompts_or_embedding
        if not isinstance(emb, TextEmbedding):
            emb = self.embed(emb)
        return self.mapping(emb.to(self.device))

    def render(self, cond: dict[str, torch.Tensor], cameras, resolution: int, background=(1.0, 1.0, 1.0), **kw):
        """Volume-render the field for conditioning ``cond`` (B prompts) from ``cameras`` (B)."""
        return self.renderer(self.field, cond, cameras.to(self.device), resolution, background=background, **kw)

    def generate(self, prompts: Sequence[str], **kw: Any) -> list:
        """Prompts -> textured ``trimesh.Trimesh`` meshes in one forward pass per batch.

        See :func:`att3d.infer.generate.generate` for the options (``batch_size``, ``grid_resolution``,
        ``threshold``, ``texture_size``, ...); ``att3d.infer.generate.write_outputs`` writes them to files.
        """
        from att3d.infer.generate import generate

        return generate(self, prompts, **kw)

    # -- files -------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``model_config.json`` and ``model.safetensors`` into ``folder`` (atomically)."""
        folder = Path(folder)
        save_tensors(folder / WEIGHTS_NAME, self.state_dict())
        save_json(folder / CONFIG_NAME, {"att3d_model": 1, **self.config, **({"extra": extra} if extra else {})})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        text_encoder: torch.nn.Module | None = None) -> AmortizedModel:
        """Load a folder written by :meth:`save_pretrained`; a mismatching architecture is a one-line error."""
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(f"{folder} is not an att3d model folder (no {CONFIG_NAME})")
        cfg = load_json(folder / CONFIG_NAME)
        cfg.pop("att3d_model", None)
        cfg.pop("extra", None)
        model = cls(cfg, text_encoder=text_encoder)
        state = load_tensors(folder / WEIGHTS_NAME)
        load_state_checked(model, state, folder / WEIGHTS_NAME)
        return model.to(device).eval()


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict`` with a one-line :class:`CheckpointError` for another architecture."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors of another shape (e.g. {k}: {tuple(state[k].shape)} vs "
                         f"{tuple(own[k].shape)})")
        raise CheckpointError(f"checkpoint {source} is from another architecture: " + "; ".join(parts))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> AmortizedModel:
    """Load an amortized model folder (``att3d.load``)."""
    return AmortizedModel.from_pretrained(path, device=device)
