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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from att3d.registry import FIELDS, MAPPINGS, RENDERERS, TEXT_ENCODERS
from att3d.text.encoders import TextEmbedding
from att3d.utils.checkpoint import CheckpointError, load_json, load_tensors, save_json, save_tensors
from att3d.utils.timing import StageTimer

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
        self.config.setdefault("renderer", {"name": "volume"})
        # Record every argument of every part, defaults included (diffusers' register_to_config): a saved folder
        # then builds the same model after a default changes.
        for part, registry, build_args in (("text_encoder", TEXT_ENCODERS, ()), ("field", FIELDS, ()),
                                           ("mapping", MAPPINGS, ("text_len", "text_dim", "out_shapes")),
                                           ("renderer", RENDERERS, ())):
            name, kw = _split(self.config[part])
            self.config[part] = {"name": name, **registry.resolve(name, exclude=build_args, **kw)}
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
        name, kw = _split(self.config["renderer"])
        self.renderer = RENDERERS.build(name, **kw)
        from att3d.mesh.extract import DEFAULT_THRESHOLD

        self.config.setdefault("extraction", {"threshold": DEFAULT_THRESHOLD})

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

        See :func:`generate_meshes` for the options (``batch_size``, ``grid_resolution``, ``threshold``,
        ``texture_size``, ...); :func:`att3d.infer.generate.write_outputs` writes them to files.
        """
        return generate_meshes(self, prompts, **kw)

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
        if isinstance(cfg, dict):
            cfg.pop("att3d_model", None)
            cfg.pop("extra", None)
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) and "name" in cfg[k]
                                                for k in ("text_encoder", "mapping", "field")):
            raise CheckpointError(f"{folder / CONFIG_NAME}: not an att3d model config (expected text_encoder, mapping "
                                  "and field sections, each with a name)")
        try:
            model = cls(cfg, text_encoder=text_encoder)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {' '.join(str(e).split())}") from None
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


def copy_model(model: AmortizedModel) -> AmortizedModel:
    """A deep copy of ``model`` (mapping, field, renderer, buffers) that shares its frozen text encoder."""
    import copy

    memo = {id(model.text_encoder): model.text_encoder}
    return copy.deepcopy(model, memo)


def repeat_conditioning(cond: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Each prompt's conditioning repeated ``n`` times in a row: (B, ...) -> (B * n, ...)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in cond.items()}


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Prompts with their white space normalised; an empty prompt (or none at all) is a one-line error."""
    from att3d.mesh.extract import GenerationError
    from att3d.text.prompts import PromptError, normalize_prompt

    if isinstance(prompts, str):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        try:
            out.append(normalize_prompt(p))
        except PromptError as e:
            raise GenerationError(f"prompt {i + 1}: {e}") from None
    if not out:
        raise GenerationError("no prompts to generate")
    return out


def generate_meshes(model: Any, prompts: Sequence[str], batch_size: int = 16, timer: StageTimer | None = None,
                    progress: bool = True, **kw: Any) -> list:
    """Prompts -> textured meshes, one forward pass per batch (no per-prompt optimisation).

    Per batch: text encoder (``encode``) -> mapping network (``mapping``) -> the field's mesh
    (:func:`att3d.mesh.extract.meshes_from_conditioning`: ``field``, ``extraction``, ``texture``, ``export``).

    Args:
        model: an :class:`AmortizedModel` (``embed``, ``mapping``, ``field``).
        prompts: P prompts (white space normalised; empty prompts are an error).
        batch_size: prompts per forward pass.
        timer: collects seconds per stage (``encode``, ``mapping``, ``field``, ``extraction``,
            ``texture``, ``export``); a fresh one is used if None.
        progress: a progress bar over batches.
        **kw: options of :func:`~att3d.mesh.extract.meshes_from_conditioning` (``grid_resolution``,
            ``threshold``, ``texture_size``, ``smooth_iterations``, ``colour_offset``, ...).

    Returns:
        P ``trimesh.Trimesh`` in prompt order; ``mesh.metadata["att3d"]`` adds ``prompt`` and ``seconds``
        (the batch's wall time divided by its size). Empty meshes are flagged, not raised.
    """
    from tqdm import tqdm

    from att3d.mesh.extract import GenerationError, meshes_from_conditioning

    prompts = check_prompts(prompts)
    if batch_size < 1:
        raise GenerationError(f"batch size must be >= 1, got {batch_size}")
    timer = timer if timer is not None else StageTimer(sync=getattr(model, "device", None) is not None
                                                       and torch.device(model.device).type == "cuda")
    was_training = model.training
    model.eval()
    meshes: list = []
    starts = range(0, len(prompts), batch_size)
    try:
        for s in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
            chunk = prompts[s:s + batch_size]
            t0 = time.perf_counter()
            with torch.no_grad():
                with timer("encode"):
                    emb = model.embed(chunk)
                with timer("mapping"):
                    cond = model.mapping(emb)
            out = meshes_from_conditioning(model, cond, timer=timer, progress=progress and len(chunk) == 1, **kw)
            per = (time.perf_counter() - t0) / len(chunk)
            for p, m in zip(chunk, out):
                m.metadata.setdefault("att3d", {}).update({"prompt": p, "seconds": per})
            meshes.extend(out)
    finally:
        model.train(was_training)
    return meshes


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> AmortizedModel:
    """Load an amortized model folder (``att3d.load``)."""
    return AmortizedModel.from_pretrained(path, device=device)
