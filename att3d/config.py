"""Configs -> objects: the one place where a Hydra config becomes att3d's parts.

Every command composes its config through Hydra (``att3d train`` is a Hydra app; the other commands use
Hydra's compose API through :func:`compose`), and every object is built here from the composed groups:

    prompts       -> PromptBank                     (att3d.text.prompts)
    text_encoder, mapping, field, renderer, extraction
                  -> AmortizedModel                 (att3d.model; components by registry name)
    guidance      -> ScoreDistillation over a prior (att3d.guidance; ``prior`` by registry name)
    trainer, stage -> Trainer with its stage objective (att3d.train)

A component's defaults live only in its ``__init__`` signature: the YAML files under ``configs/`` override
them (``tests/test_config_defaults.py`` fails when a YAML value drifts from the signature it overrides).
Library modules never import this module: they take built objects.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from att3d.utils.errors import Att3dError
from att3d.utils.paths import configs_dir, resolve_path

#: Keys of the ``guidance`` group that are not arguments of :class:`~att3d.guidance.sds.ScoreDistillation`.
GUIDANCE_EXTRA_KEYS = ("prior", "background", "refine", "method", "vsd")
#: ``guidance.method``: the score distillation class, by name; a method's options are the group's block of its name.
GUIDANCE_METHODS = {"sds": "att3d.guidance.sds:ScoreDistillation",
                    "vsd": "att3d.guidance.vsd:VariationalScoreDistillation"}


def compose(config_name: str = "train", overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config ``configs/<config_name>.yaml`` composed by Hydra with ``overrides``, as a plain dict.

    Interpolations that need a running Hydra app (``${hydra:...}``, the run folder) are left unresolved; every
    group's own values are resolved. A bad override is a one-line :class:`Att3dError`.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_resolvers()
    was = GlobalHydra.instance().is_initialized()
    if was:  # e.g. called inside a running Hydra app: compose in a fresh context, then restore nothing else
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs_dir().resolve()), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except Exception as e:
        if type(e).__module__.split(".")[0] in ("hydra", "omegaconf"):
            raise Att3dError(f"config {config_name} with {' '.join(overrides) or 'no overrides'}: "
                             f"{' '.join(str(e).split())}") from None
        raise
    raw = OmegaConf.to_container(cfg, resolve=False)
    out: dict[str, Any] = {}
    for key in raw:
        try:
            node = cfg[key]
            out[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except Exception:  # ${hydra:...} or the run folder outside an app: left as written
            out[key] = raw[key]
    return out


def register_resolvers() -> None:
    """What composing ``configs/train.yaml`` needs: the OmegaConf resolver ``att3d_run_dir`` and the groups'
    schemas (:func:`register_schemas`)."""
    from omegaconf import OmegaConf

    register_schemas()
    if not OmegaConf.has_resolver("att3d_run_dir"):
        from att3d.train.run_dir import run_dir_for

        OmegaConf.register_new_resolver("att3d_run_dir", run_dir_for)


def guidance_config(name_or_path: str = "shapes", prior: str | None = None) -> dict[str, Any]:
    """A ``guidance`` group as a dict: an option of ``configs/guidance/`` (composed by Hydra) or a YAML file;
    ``prior`` replaces ``prior.path``."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        if not path.is_file():
            raise Att3dError(f"guidance config not found: {path}")
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    else:
        choices = sorted(p.stem for p in (configs_dir() / "guidance").glob("*.yaml"))
        if name_or_path not in choices:
            raise Att3dError(f"unknown guidance {name_or_path!r} (choose from {', '.join(choices)} or give a "
                             "YAML file)")
        cfg = compose("train", [f"guidance={name_or_path}"])["guidance"]
    if not isinstance(cfg, dict) or not isinstance(cfg.get("prior"), dict):
        raise Att3dError(f"guidance config {name_or_path}: expected a mapping with a 'prior' section")
    if prior:
        cfg["prior"]["path"] = str(prior)
    return cfg


def check_prior_exists(gcfg: dict[str, Any]) -> None:
    """A one-line error when the config names the shapes prior at a folder that does not exist."""
    path = gcfg["prior"].get("path")
    if gcfg["prior"].get("name") == "shapes" and path and not resolve_path(path).exists():
        raise Att3dError(f"no shapes prior at {path} (train one with scripts/train_prior.py or pass --prior)")


def build_guidance(gcfg: dict[str, Any], device: str | Any = "cpu", **overrides: Any):
    """The score distillation of a ``guidance`` group (its ``prior`` built by name): the class of
    ``guidance.method`` (:data:`GUIDANCE_METHODS`: SDS or VSD) with that method's block of options.

    ``overrides`` (values that are not None) replace SDS arguments of the config (e.g. ``guidance_scale``).
    """
    from att3d.registry import PRIORS

    check_prior_exists(gcfg)
    sds = {k: v for k, v in gcfg.items() if k not in GUIDANCE_EXTRA_KEYS}
    sds.update({k: v for k, v in overrides.items() if v is not None})
    prior_cfg = dict(gcfg["prior"])
    name, path = prior_cfg.pop("name"), prior_cfg.pop("path")
    local = resolve_path(path)
    prior = PRIORS.build(name, path=str(local) if local.exists() else path, device=str(device), **prior_cfg)
    method = gcfg.get("method") or "sds"
    if method not in GUIDANCE_METHODS:
        raise Att3dError(f"guidance.method must be one of {', '.join(GUIDANCE_METHODS)}, got {method!r}")
    module, _, cls_name = GUIDANCE_METHODS[method].partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    if method != "sds":
        sds.update(dict(gcfg.get(method) or {}))
    for key in ("t_range", "t_anneal", "estimator_t_range"):
        if sds.get(key) is not None:
            sds[key] = tuple(sds[key])
    try:
        guidance = cls(prior, **sds)
    except TypeError as e:
        raise Att3dError(f"invalid guidance config: {' '.join(str(e).split())}") from None
    guidance.prior_source = {"name": name, "path": str(path), **prior_cfg}  # for the model's record of its teacher
    return guidance


def background_of(gcfg: dict[str, Any]) -> tuple[float, float, float]:
    """The background colour that the prior was trained with (``guidance.background``; white if unset)."""
    return tuple(float(c) for c in (gcfg.get("background") or (1.0, 1.0, 1.0)))  # type: ignore[return-value]


def model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The model part of a train config: ``text_encoder``, ``mapping``, ``field``, ``renderer``, ``extraction``."""
    out = {k: dict(cfg[k]) for k in ("text_encoder", "mapping", "field", "renderer")}
    if cfg.get("extraction"):
        out["extraction"] = dict(cfg["extraction"])
    return out


def prompt_bank(prompts_cfg: dict[str, Any], key: str = "train"):
    """The :class:`~att3d.text.prompts.PromptBank` of ``prompts.<key>`` (a built-in set name or a prompt file)."""
    from att3d.text.prompts import PromptBank, resolve_prompts

    return PromptBank(resolve_prompts(prompts_cfg[key], base_dir=configs_dir() / "prompts"))


def build_objective(stage_cfg: dict[str, Any] | None):
    """The stage objective of a ``stage`` group (``name`` chooses it in :data:`att3d.train.objectives.STAGES`;
    the other keys are its arguments)."""
    from att3d.train.objectives import STAGES

    kw = dict(stage_cfg or {"name": "nerf"})
    name = kw.pop("name", "nerf")
    try:
        factory = STAGES.get(str(name))
    except KeyError as e:
        raise Att3dError(str(e).strip("'\"")) from None
    try:
        return factory(**kw)
    except TypeError as e:
        raise Att3dError(f"stage={name}: {' '.join(str(e).split())}") from None


def build_model(cfg: dict[str, Any], device: Any = "cpu"):
    """``(model, source, source_extra)``: the model of a train config, built from its ``text_encoder``,
    ``mapping``, ``field``, ``renderer`` and ``extraction`` groups, or loaded from ``init_from`` (a model folder;
    then those groups are not used); ``source`` is the folder (None) and ``source_extra`` its ``extra``."""
    from att3d.model import AmortizedModel

    init_from = cfg.get("init_from")
    grow = grow_levels_option(cfg.get("grow_levels"))
    if init_from in (None, "", "None", "null"):
        if grow:
            raise Att3dError("grow_levels adds levels to a trained model: give init_from=MODEL_FOLDER too")
        return AmortizedModel(model_config(cfg)), None, None
    from att3d.model import CONFIG_NAME, read_model_config

    folder = resolve_path(init_from)
    if not (folder / CONFIG_NAME).is_file():
        raise Att3dError(f"init_from: {init_from} is not an att3d model folder (no {CONFIG_NAME})")
    _, extra = read_model_config(folder)  # checked against the schema: one line naming the file and the key
    model = AmortizedModel.from_pretrained(folder, device=device)
    if grow:
        from att3d.train.grow import grow_levels

        model = grow_levels(model, grow)
    return model, str(folder), extra


def grow_levels_option(value: Any) -> list[int]:
    """The ``grow_levels`` option: a list of resolutions (``[64]``), or null / empty for none."""
    if value in (None, "", "None", "null"):
        return []
    if isinstance(value, (int, str)) or not all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        raise Att3dError(f"grow_levels must be a list of resolutions, e.g. [64], got {value!r}")
    return [int(r) for r in value]


def embedding_cache_dir(value: Any) -> Path | None:
    """The folder of the ``embedding_cache`` option: null -> the default cache
    (:func:`att3d.text.embedding_cache.default_cache_dir`), false -> None (embeddings kept in memory), a path."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("false", "off", "none", "no")):
        return None
    if value in (None, "", "null"):
        from att3d.text.embedding_cache import default_cache_dir

        return default_cache_dir()
    if not isinstance(value, (str, Path)):
        raise Att3dError(f"embedding_cache must be a folder, null (the default cache) or false (none), got {value!r}")
    path = resolve_path(value)
    if path.exists() and not path.is_dir():
        raise Att3dError(f"embedding_cache: {path} is a file, not a folder")
    return path


def check_run_options(cfg: dict[str, Any]) -> None:
    """The top-level options of a train config (``extraction``, ``progress``, ``resume_checkpoint``, ...), checked
    before anything is loaded: a one-line :class:`Att3dError` naming the option."""
    from att3d.model import check_extraction

    if cfg.get("extraction") is not None:
        check_extraction(cfg["extraction"])
    grow_levels_option(cfg.get("grow_levels"))
    if not isinstance(cfg.get("progress", True), bool):
        raise Att3dError(f"progress must be true or false, got {cfg.get('progress')!r}")
    for key in ("init_from", "resume", "resume_checkpoint", "run_dir"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, (str, Path)):
            raise Att3dError(f"{key} must be a path, got {value!r}")


def build_trainer(cfg: dict[str, Any], run_dir: str | Path | None, resume: bool = True):
    """The :class:`~att3d.train.trainer.Trainer` of a resolved train config (a plain dict).

    Cheap checks come first (the top-level options, prompts, every trainer option, the stage's options, the batch
    split over the ranks); with ``resume``, the model is checked against the run's checkpoint to resume from (the
    latest, or ``resume_checkpoint``) before the prior is loaded, so a checkpoint of another architecture (or a
    missing ``latest.json``) fails in seconds, not after loading a large prior. ``embedding_cache`` (null: the
    default cache folder; false: none) holds the prompts' embeddings (see :class:`~att3d.train.trainer.Trainer`).
    """
    import torch

    from att3d.train import distributed
    from att3d.train.trainer import Trainer, check_model_fits, check_stage, trainer_config_from_dict
    from att3d.utils.devices import pick_device

    check_run_options(cfg)
    prompts = prompt_bank(cfg["prompts"])  # bad prompts fail before the heavy loading
    tcfg = trainer_config_from_dict(cfg["trainer"])
    objective = build_objective(cfg.get("stage"))
    check_stage(objective, tcfg)
    if not getattr(objective, "from_scratch", objective.name == "nerf") and cfg.get("init_from") in (None, "", "None",
                                                                                                    "null"):
        raise Att3dError(f"stage={objective.name} refines a trained model: give init_from=MODEL_FOLDER "
                         "(e.g. init_from=assets/att3d-shapes64)")
    device = distributed.rank_device(pick_device(tcfg.device))
    distributed.shard(tcfg.batch_size)  # a batch that does not split over the ranks fails before the loading
    check_prior_exists(cfg["guidance"])
    torch.manual_seed(tcfg.seed)  # the initial weights depend on the seed only
    model, source, source_extra = build_model(cfg, device)
    objective.source, objective.source_extra = source, source_extra
    objective.grown_levels = grow_levels_option(cfg.get("grow_levels"))
    checkpoint = cfg.get("resume_checkpoint") or None
    if resume and run_dir is not None:  # on a copy: a stage's set-up reads the starting weights (mesh: its reference)
        from att3d.model import copy_model

        check_model_fits(copy_model(model), run_dir, checkpoint=checkpoint)
    cache = embedding_cache_dir(cfg.get("embedding_cache"))
    gcfg = cfg["guidance"]
    guidance = build_guidance(gcfg, str(device))
    try:
        return Trainer(model, prompts, guidance, tcfg, run_dir, objective=objective, background=background_of(gcfg),
                       embedding_cache=cache, progress=bool(cfg.get("progress", True)),
                       resume_checkpoint=checkpoint if resume else None)
    except (ValueError, TypeError) as e:  # a component rejected its options
        if isinstance(e, Att3dError):
            raise
        raise Att3dError(f"invalid configuration: {' '.join(str(e).split())}") from None


# -- schemas: the __init__ signatures as Hydra's structured configs ------------------------------------------------

#: Arguments that the builders pass themselves (not config keys).
BUILD_ARGS = {"mapping": ("text_len", "text_dim", "out_shapes"), "prior": ("path", "device")}


def signature_schema(factory: Any, name: str | None = None, exclude: Sequence[str] = ()) -> type:
    """A dataclass whose fields are ``factory``'s keyword arguments with their defaults (``name`` first, when given).

    Hydra uses it as the schema of a config group option: every argument can be overridden on the command line
    (``field.num_levels=4``) while the YAML file sets only what differs from the signature, and an unknown key
    is an error at composition. Field types are left open (``Any``): the component checks its own values.
    """
    import dataclasses
    import inspect

    target = factory.__init__ if inspect.isclass(factory) else factory
    fields: list[tuple[str, Any, Any]] = []
    if name is not None:
        fields.append(("name", Any, dataclasses.field(default=name)))
    if dataclasses.is_dataclass(factory):  # a settings dataclass: its fields' defaults (factories called)
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else
                    f.default_factory() if f.default_factory is not dataclasses.MISSING else inspect.Parameter.empty
                    for f in dataclasses.fields(factory)}
    else:
        defaults = {arg: p.default for arg, p in inspect.signature(target).parameters.items()
                    if arg != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for arg, default in defaults.items():
        if arg in exclude:
            continue
        if default is inspect.Parameter.empty:
            spec = dataclasses.field(default="???")
        elif dataclasses.is_dataclass(default) and not isinstance(default, type):
            spec = dataclasses.field(default_factory=lambda d=default: _as_plain(dataclasses.asdict(d)))
        elif isinstance(default, (list, tuple, dict)):
            spec = dataclasses.field(default_factory=lambda d=default: _as_plain(d))
        else:
            spec = dataclasses.field(default=default)
        fields.append((arg, Any, spec))
    label = getattr(factory, "__name__", None) or (name or "config").title().replace("_", "")
    return dataclasses.make_dataclass(f"{label}Schema", fields)


def _as_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_plain(v) for v in value]
    return value


def register_schemas() -> None:
    """Store the schema of every config group option in Hydra's ConfigStore as ``<group>/<name>_schema``, which
    the YAML files under ``configs/`` extend (``defaults: [<name>_schema, _self_]``)."""
    from hydra.core.config_store import ConfigStore

    from att3d.registry import FIELDS, MAPPINGS, RENDERERS, TEXT_ENCODERS
    from att3d.train.objectives import STAGES
    from att3d.train.trainer import TrainerConfig

    store = ConfigStore.instance()
    for group, registry in (("field", FIELDS), ("mapping", MAPPINGS), ("renderer", RENDERERS),
                            ("text_encoder", TEXT_ENCODERS), ("stage", STAGES)):
        for name in registry.names():
            schema = signature_schema(registry.get(name), name, exclude=BUILD_ARGS.get(group, ()))
            store.store(group=group, name=f"{name}_schema", node=schema)
    store.store(group="trainer", name="default_schema", node=signature_schema(TrainerConfig))
