"""One registry of pluggable parts, chosen by name in configs.

Each registry maps a name (as written in a Hydra config's ``name:`` key) to a
class or factory. Modules register their parts on import; :func:`build` imports
the modules that hold the built-in parts so that a config can name any of them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    """A named table of factories: ``REG.register("name")(factory)``, ``REG.build("name", **kwargs)``."""

    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._modules = modules
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        for m in self._modules:
            importlib.import_module(m)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)


TEXT_ENCODERS = Registry("text encoder", ("att3d.text.encoders",))
MAPPINGS = Registry("mapping network", ("att3d.mapping",))
FIELDS = Registry("field", ("att3d.field",))
RENDERERS = Registry("renderer", ("att3d.render",))
PRIORS = Registry("diffusion prior", ("att3d.guidance.priors",))
