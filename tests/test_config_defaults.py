"""One source of defaults: a component's ``__init__`` (or factory) signature. The YAML options under ``configs/``
may only override it: every key must be an argument, and a key that repeats the signature's default is a
duplicate (two copies of a default drift apart: ``output_scale`` 0.3 in code vs 1.0 in the YAML once did)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from att3d.registry import FIELDS, MAPPINGS, RENDERERS, TEXT_ENCODERS, Registry, init_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS: dict[str, Registry] = {"field": FIELDS, "mapping": MAPPINGS, "renderer": RENDERERS,
                               "text_encoder": TEXT_ENCODERS}
#: Arguments that the builders pass themselves (never config keys).
BUILD_ARGS = {"mapping": ("text_len", "text_dim", "out_shapes")}
#: Keys of a guidance option that are not ScoreDistillation arguments.
GUIDANCE_EXTRA_KEYS = ("prior", "background", "refine", "method", "vsd", "defaults")
#: Duplicates in configs/guidance/, which this test's owner cannot edit: each must still be a duplicate (an entry
#: that is no longer one fails, so the list only shrinks). Empty it when the guidance options are cleaned up.
KNOWN_GUIDANCE_DUPLICATES: dict[str, set[str]] = {
    "deepfloyd_if.yaml": {"guidance_scale_low", "low_t", "t_range", "t_anneal", "weighting", "grad_clip",
                          "view_guidance", "view_guidance_azimuth"},
    "shapes.yaml": {"guidance_scale", "guidance_scale_low", "low_t", "t_range", "t_anneal", "weighting",
                    "grad_clip", "view_guidance", "view_guidance_azimuth"},
    "stable_diffusion.yaml": {"guidance_scale_low", "low_t", "t_range", "t_anneal", "weighting", "grad_clip",
                              "view_guidance", "view_guidance_azimuth"},
}


def _options(group: str) -> list[Path]:
    return sorted((CONFIGS / group).glob("*.yaml"))


COMPONENT_OPTIONS = [pytest.param(g, p, id=f"{g}/{p.stem}") for g in GROUPS for p in _options(g)]
GUIDANCE_OPTIONS = [pytest.param(p, id=p.stem) for p in _options("guidance")]


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    assert isinstance(data, dict), f"{path}: expected a mapping"
    return data


def same_value(a: Any, b: Any) -> bool:
    """YAML value == Python default (lists equal tuples; 1.0e-4 equals 1e-4; True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_against_signature(where: str, values: dict[str, Any], factory: Any,
                            exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(unknown keys, keys that repeat the default) of ``values`` for ``factory``'s signature."""
    params = {k: p for k, p in init_parameters(factory).items() if k not in exclude}
    unknown = [f"{where}: {k!r} is not an argument of {factory.__qualname__} (arguments: {', '.join(params)})"
               for k in values if k not in params]
    dups = [k for k, v in values.items()
            if k in params and params[k].default is not inspect.Parameter.empty and same_value(v, params[k].default)]
    return unknown, dups


def test_every_group_has_options():
    for group in (*GROUPS, "guidance"):
        assert _options(group), f"no options in configs/{group}/"


@pytest.mark.parametrize("group, path", COMPONENT_OPTIONS)
def test_component_option_only_overrides_its_signature(group, path):
    cfg = _load(path)
    name = cfg.pop("name", None)
    registry = GROUPS[group]
    assert name in registry.names(), f"{path}: name {name!r} is not a registered {registry.kind}"
    # The YAML extends the signature's schema (att3d.config.register_schemas), so that every argument can be
    # overridden on the command line although the file does not list it.
    assert cfg.pop("defaults", None) == [f"{name}_schema", "_self_"], (
        f"{path}: expected 'defaults: [{name}_schema, _self_]' before the keys")
    unknown, dups = check_against_signature(str(path.relative_to(CONFIGS)), cfg, registry.get(name),
                                            BUILD_ARGS.get(group, ()))
    assert not unknown, "\n".join(unknown)
    assert not dups, (f"{path.relative_to(CONFIGS)} repeats the signature's default of {', '.join(dups)}: "
                      "delete these keys (the defaults live in the signature only)")


@pytest.mark.parametrize("path", GUIDANCE_OPTIONS)
def test_guidance_option_only_overrides_score_distillation(path):
    from att3d.guidance.sds import ScoreDistillation

    cfg = _load(path)
    sds = cfg["sds"] if isinstance(cfg.get("sds"), dict) else {
        k: v for k, v in cfg.items() if k not in GUIDANCE_EXTRA_KEYS}
    unknown, dups = check_against_signature(f"guidance/{path.name}", sds, ScoreDistillation, ("prior",))
    assert not unknown, "\n".join(unknown)
    known = KNOWN_GUIDANCE_DUPLICATES.get(path.name, set())
    new = sorted(set(dups) - known)
    assert not new, f"guidance/{path.name} repeats ScoreDistillation's default of {', '.join(new)}: delete them"
    stale = sorted(known - set(dups))
    assert not stale, (f"guidance/{path.name}: {', '.join(stale)} no longer repeat the default; remove them from "
                       "KNOWN_GUIDANCE_DUPLICATES")
    # the method's blocks: each lists its class's own arguments (so that they can be set on the command line),
    # with the signature's defaults
    from att3d.config import GUIDANCE_METHODS

    assert cfg.get("method") == "sds", f"guidance/{path.name}: method must be there, sds"
    for method, where in GUIDANCE_METHODS.items():
        if method == "sds":
            continue
        module, _, name = where.partition(":")
        cls = getattr(importlib.import_module(module), name)
        block = dict(cfg.get(method) or {})
        own = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if v.kind == v.KEYWORD_ONLY}
        assert set(block) == set(own), f"guidance/{path.name}: {method} lists {sorted(block)}, not {sorted(own)}"
        assert all(block[k] == (list(d) if isinstance(d, tuple) else d) for k, d in own.items()), (
            f"guidance/{path.name}: {method}'s values differ from {name}'s defaults")


def test_same_value_rules():
    assert same_value([0.02, 0.98], (0.02, 0.98)) and same_value(1.0e-4, 0.0001) and same_value(32768, 2**15)
    assert not same_value(1, True) and not same_value(None, 0) and not same_value("box", "sphere")


def test_composed_option_is_the_signature_with_the_overrides():
    """What Hydra composes for a group option is ``{"name": ..., **registry.resolve(name, **yaml keys)}``."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from att3d.config import register_schemas

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.fspath(CONFIGS), version_base=None):
        for group, registry in GROUPS.items():
            for path in _options(group):
                yaml_cfg = _load(path)
                yaml_cfg.pop("defaults")
                name = yaml_cfg.pop("name")
                composed = OmegaConf.to_container(compose(f"{group}/{path.stem}"), resolve=True)[group]
                expected = {"name": name, **registry.resolve(name, exclude=BUILD_ARGS.get(group, ()), **yaml_cfg)}
                assert composed == expected, path
                # an argument that the file does not list can still be overridden (plain key=value)
                key = next(k for k in expected if k != "name" and k not in yaml_cfg)
                assert compose(f"{group}/{path.stem}", overrides=[f"{group}.{key}=7"])[group][key] == 7
