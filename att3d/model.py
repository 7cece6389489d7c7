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

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from att3d.registry import FIELDS, MAPPINGS, RENDERERS, TEXT_ENCODERS
from att3d.text.encoders import TextEmbedding
from att3d.utils.checkpoint import (
    CheckpointError,
    atomic_folder,
    load_json,
    load_tensors,
    save_json,
    save_tensors,
)
from att3d.utils.errors import Att3dError
from att3d.utils.timing import StageTimer

CONFIG_NAME = "model_config.json"
WEIGHTS_NAME = "model.safetensors"
#: The parts of a model config (each names a registered component and gives its arguments), in build order.
PARTS = ("text_encoder", "mapping", "field", "renderer")
#: Other top-level keys of ``model_config.json``: the format version, the extraction settings, the training record.
OTHER_KEYS = ("att3d_model", "extraction", "extra")
_REGISTRIES = {"text_encoder": TEXT_ENCODERS, "mapping": MAPPINGS, "field": FIELDS, "renderer": RENDERERS}


class ModelConfigError(Att3dError, ValueError):
    """A model config (``model_config.json`` or the model groups of a train config) does not fit its schema."""


def _split(cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    cfg = dict(cfg)
    return cfg.pop("name"), cfg


def check_extraction(extraction: Any, where: str = "extraction") -> dict[str, Any]:
    """The ``extraction`` settings with a finite, non-negative ``threshold`` (a number); else a one-line
    :class:`ModelConfigError` naming ``where``."""
    if not isinstance(extraction, dict):
        raise ModelConfigError(f"{where} must be a mapping with a threshold, got {extraction!r}")
    unknown = sorted(set(extraction) - {"threshold"})
    if unknown:
        raise ModelConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: threshold)")
    if "threshold" not in extraction:
        return dict(extraction)
    value = extraction["threshold"]
    try:
        if isinstance(value, bool):
            raise ValueError
        threshold = float(value)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}.threshold must be a number, got {value!r}") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise ModelConfigError(f"{where}.threshold must be a finite density >= 0, got {value!r}")
    return {**extraction, "threshold": threshold}


def check_model_config(cfg: Any, where: str = "model config") -> dict[str, Any]:
    """``cfg`` checked against the model config's schema: a mapping of the :data:`PARTS` (``text_encoder``,
    ``mapping`` and ``field`` required, ``renderer`` optional), each a mapping that names a registered component
    and only its arguments, plus the optional :data:`OTHER_KEYS`. Every violation is a one-line
    :class:`ModelConfigError` starting with ``where`` and naming the key, e.g.
    ``runs/x/model/model_config.json: field.foo: field 'grid' has no argument(s) foo; ...``.

    Returns a copy of the model parts (and ``extraction``), without ``att3d_model`` and ``extra``.
    """
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{where}: expected a mapping of the sections {', '.join(PARTS)}, got "
                               f"{type(cfg).__name__}")
    unknown = sorted(str(k) for k in set(cfg) - set(PARTS) - set(OTHER_KEYS))
    if unknown:
        raise ModelConfigError(f"{where}: unknown section(s) {', '.join(unknown)} (known: "
                               f"{', '.join((*PARTS, *OTHER_KEYS))})")
    out: dict[str, Any] = {}
    for part in PARTS:
        if part not in cfg:
            if part == "renderer":
                continue
            raise ModelConfigError(f"{where}: no {part} section (expected text_encoder, mapping and field sections, "
                                   "each with a name)")
        section = cfg[part]
        if not isinstance(section, dict):
            raise ModelConfigError(f"{where}: {part} must be a mapping with a name, got {section!r}")
        name = section.get("name")
        if not isinstance(name, str) or not name:
            raise ModelConfigError(f"{where}: {part}.name must name a registered {_REGISTRIES[part].kind}, got "
                                   f"{name!r}")
        registry = _REGISTRIES[part]
        if name not in registry:
            raise ModelConfigError(f"{where}: {part}.name: unknown {registry.kind} {name!r}; choose one of: "
                                   f"{', '.join(registry.names())}")
        kw = {k: v for k, v in section.items() if k != "name"}
        build_args = ("text_len", "text_dim", "out_shapes") if part == "mapping" else ()
        try:
            registry.resolve(name, exclude=build_args, **kw)
        except TypeError as e:
            text = " ".join(str(e).split())
            bad = sorted(set(kw) - set(_parameters(registry, name)))
            key = f"{part}.{bad[0]}" if bad else part
            raise ModelConfigError(f"{where}: {key}: {text}") from None
        out[part] = dict(section)
    if "extraction" in cfg:
        out["extraction"] = check_extraction(cfg["extraction"], f"{where}: extraction")
    if "extra" in cfg and cfg["extra"] is not None and not isinstance(cfg["extra"], dict):
        raise ModelConfigError(f"{where}: extra must be a mapping, got {type(cfg['extra']).__name__}")
    return out


def _parameters(registry: Any, name: str) -> list[str]:
    from att3d.registry import accepts_any_keyword, init_parameters

    obj = registry.get(name)
    return list(init_parameters(obj)) + (["*"] if accepts_any_keyword(obj) else [])


def read_model_config(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(config, extra)`` of a model folder's ``model_config.json``, checked against the schema
    (:func:`check_model_config`); every problem is a one-line :class:`CheckpointError` naming the file."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file, not an att3d model folder")
    if not path.is_file():
        raise CheckpointError(f"{folder} is not an att3d model folder (no {CONFIG_NAME})")
    raw = load_json(path)
    try:
        cfg = check_model_config(raw, str(path))
    except ModelConfigError as e:
        raise CheckpointError(str(e)) from None
    return cfg, (raw.get("extra") if isinstance(raw.get("extra"), dict) else None)


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
        if "extraction" in self.config:
            self.config["extraction"] = check_extraction(self.config["extraction"])
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
        """Embed prompts with the frozen text encoder: -> TextEmbedding (B, L, D).

        Raises:
            ModelConfigError: no prompts (or a bare string instead of a list of them).
        """
        if isinstance(prompts, str):
            raise ModelConfigError(f"expected a list of prompts, got the string {prompts[:40]!r} (use [prompt])")
        prompts = list(prompts)
        if not prompts:
            raise ModelConfigError("no prompts to embed (an empty list)")
        return self.text_encoder(prompts).to(self.device)

    def conditioning(self, prompts_or_embedding: Sequence[str] | TextEmbedding) -> dict[str, torch.Tensor]:
        """Per-prompt field conditioning from prompts or embeddings: dict of (B, ...) tensors.

        Raises:
            ModelConfigError: no prompts (an empty list or an embedding of batch 0).
        """
        emb = prompts_or_embedding
        if not isinstance(emb, TextEmbedding):
            emb = self.embed(emb)
        if len(emb) == 0:
            raise ModelConfigError("no prompts to condition on (an embedding of batch 0)")
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
    def save_pretrained(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """Write ``model_config.json`` and ``model.safetensors`` as the folder ``folder``, atomically: the files go
        to a temporary folder that then replaces ``folder`` as a whole (:func:`~att3d.utils.checkpoint.atomic_folder`),
        so ``folder`` is never half-written; a refused write is a one-line
        :class:`~att3d.utils.checkpoint.WriteError`. ``dtype`` (e.g. ``torch.float16``, as the shipped models are
        stored): the floating-point weights are written in that precision; :meth:`from_pretrained` converts them
        back to the model's (float32)."""
        folder = Path(folder)
        with atomic_folder(folder) as tmp:
            self.write_files(tmp, extra, dtype=dtype)
        return folder

    def write_files(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Write ``model_config.json`` and ``model.safetensors`` into the existing ``folder`` (each file atomically;
        :meth:`save_pretrained` makes the folder atomic). ``extra`` is the record of how the model was made; the
        one a loaded model came with (``config["extra"]``) is not written again. ``dtype``: the precision of the
        floating-point weights in the file (None: the model's own)."""
        folder = Path(folder)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_tensors(folder / WEIGHTS_NAME, state)
        config = {k: v for k, v in self.config.items() if k != "extra"}
        save_json(folder / CONFIG_NAME, {"att3d_model": 1, **config, **({"extra": extra} if extra else {})})

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        text_encoder: torch.nn.Module | None = None) -> AmortizedModel:
        """Load a folder written by :meth:`save_pretrained`; a config that does not fit the schema, weights of
        another architecture, dtype or with non-finite values are one-line errors naming the file. The folder's
        ``extra`` (how it was trained) is kept as ``model.config["extra"]``."""
        folder = Path(folder)
        cfg, extra = read_model_config(folder)
        try:
            model = cls(cfg, text_encoder=text_encoder)
        except (KeyError, TypeError, ValueError, Att3dError) as e:  # a value a component refuses
            raise CheckpointError(f"{folder / CONFIG_NAME}: {' '.join(str(e).split())}") from None
        state = load_tensors(folder / WEIGHTS_NAME)
        load_state_checked(model, state, folder / WEIGHTS_NAME)
        if extra:
            model.config["extra"] = extra
        return model.to(device).eval()


def load_state_checked(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict`` with a one-line :class:`CheckpointError` naming ``source`` for weights that do
    not fit: another architecture (missing, unexpected or differently shaped tensors), a tensor of another kind
    of dtype (integer weights where the model has floating-point ones: another precision, e.g. fp16 or bf16, is
    converted), or weights that are not finite (NaN / inf: damaged, or a diverged run)."""
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
    kinds = sorted(k for k in own if own[k].is_floating_point() != state[k].is_floating_point()
                   or (own[k].dtype == torch.bool) != (state[k].dtype == torch.bool))
    if kinds:
        k = kinds[0]
        raise CheckpointError(f"checkpoint {source}: {len(kinds)} tensor(s) of the wrong dtype (e.g. {k}: "
                              f"{str(state[k].dtype).removeprefix('torch.')}, the model has "
                              f"{str(own[k].dtype).removeprefix('torch.')}): not weights of this model")
    bad = [k for k in sorted(state) if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if bad:
        k = bad[0]
        n = int((~torch.isfinite(state[k])).sum())
        raise CheckpointError(f"checkpoint {source}: {len(bad)} tensor(s) hold NaN or inf values (e.g. {k}: {n} of "
                              f"{state[k].numel()}): the weights are damaged or from a diverged run")
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
    from att3d.text.prompts import PromptError, normalize_prompts

    if isinstance(prompts, (list, tuple)) and not prompts:
        raise GenerationError("no prompts to generate")
    try:
        out = normalize_prompts(prompts)
    except PromptError as e:
        raise GenerationError(str(e)) from None
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
