"""One registry per kind of pluggable part, chosen by name in configs.

Each registry maps a name (as written in a Hydra config's ``name:`` key) to a class or factory. Parts
register themselves on import with a decorator::

    from att3d.registry import FIELDS

    @FIELDS.register("triplane")
    class TriplaneField(torch.nn.Module): ...

A registry imports its modules on first use (``names()``, ``get()``, ``build()``, ``resolve()``): for a
package, the package and every module in it (:func:`pkgutil.iter_modules`, sub-packages included), so a new
file in ``att3d/field/`` is found without an import line in ``att3d/field/__init__.py``. Importing this
module is cheap (no torch): the parts' modules are imported only then.

A part's defaults live in one place, its ``__init__`` (or factory) signature; :meth:`Registry.resolve` gives
every argument with the defaults filled in, as plain JSON values (as diffusers' ``register_to_config`` does).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def import_all(module: str) -> None:
    """Import ``module``; for a package also every module inside it (recursively)."""
    mod = importlib.import_module(module)
    path = getattr(mod, "__path__", None)
    if path is None:
        return
    for info in pkgutil.iter_modules(path, prefix=f"{module}."):
        if info.ispkg:
            import_all(info.name)
        else:
            importlib.import_module(info.name)


def init_parameters(obj: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """The named arguments of a class's ``__init__`` (without ``self``) or of a factory function."""
    sig = inspect.signature(obj)
    return {k: p for k, p in sig.parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def accepts_any_keyword(obj: Callable[..., Any]) -> bool:
    """Whether ``obj`` takes ``**kwargs`` (then any keyword is an argument)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(obj).parameters.values())


def to_json_value(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON data (tuples become lists, paths strings); TypeError for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, where) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: a mapping with non-string keys is not JSON-serialisable")
        return {k: to_json_value(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} {value!r} is not JSON-serialisable")


class Registry:
    """A named table of factories: ``REG.register("name")(factory)``, ``REG.build("name", **kwargs)``.

    Args:
        kind: what the entries are, for error messages ("field", "mesh exporter", ...).
        modules: modules or packages that hold the built-in entries, imported on first use (a package with
            all its modules).
    """

    def __init__(self, kind: str, modules: Iterable[str] = ()):
        self.kind = kind
        self._modules = tuple(modules)
        self._items: dict[str, Callable[..., Any]] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a class or function under ``name`` (a second, different entry is a KeyError)."""
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not obj:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded or self._loading:  # _loading: a module asked during its own import
            return
        self._loading = True
        try:
            for m in self._modules:
                import_all(m)
            self._loaded = True
        finally:
            self._loading = False

    def names(self, sort: bool = True) -> list[str]:
        """The registered names, sorted (or in the order of registration)."""
        self._load()
        return sorted(self._items) if sort else list(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def get(self, name: str) -> Callable[..., Any]:
        """The entry registered as ``name``; an unknown name is a KeyError that lists the choices."""
        self._load()
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """``get(name)(**kwargs)``."""
        return self.get(name)(**kwargs)

    def resolve(self, name: str, exclude: Iterable[str] = (), **kwargs: Any) -> dict[str, Any]:
        """Every argument of entry ``name``: the signature's defaults with ``kwargs`` applied on top.

        The result is plain JSON data in signature order (tuples become lists), so that a saved config
        records the defaults it was built with: ``build(name, **resolve(name, **kw), **excluded)`` builds the
        same part as ``build(name, **kw, **excluded)``, also after a default changes.

        Args:
            name: a registered name.
            exclude: arguments the caller passes at build time (e.g. a mapping's ``text_len``, ``text_dim``,
                ``out_shapes``); left out of the result, and not required.
            kwargs: the given arguments (a ``**kwargs`` entry accepts any keyword and keeps it).

        Raises:
            TypeError: an unknown argument, a required argument neither given nor excluded, or a value that is
                not JSON-serialisable.
        """
        obj = self.get(name)
        params = init_parameters(obj)
        skip = set(exclude)
        unknown = sorted(set(kwargs) - set(params) - skip)
        if unknown and not accepts_any_keyword(obj):
            raise TypeError(f"{self.kind} {name!r} has no argument(s) {', '.join(unknown)}; its arguments: "
                            f"{', '.join(params)}")
        out: dict[str, Any] = {}
        for key, p in params.items():
            if key in skip:
                continue
            if key in kwargs:
                value = kwargs[key]
            elif p.default is not inspect.Parameter.empty:
                value = p.default
            else:
                raise TypeError(f"{self.kind} {name!r}: missing the required argument {key!r}")
            out[key] = to_json_value(value, f"{self.kind} {name!r} argument {key!r}")
        for key in unknown:  # kept for a **kwargs entry
            out[key] = to_json_value(kwargs[key], f"{self.kind} {name!r} argument {key!r}")
        return out


TEXT_ENCODERS = Registry("text encoder", ("att3d.text",))
MAPPINGS = Registry("mapping network", ("att3d.mapping",))
FIELDS = Registry("field", ("att3d.field",))
RENDERERS = Registry("renderer", ("att3d.render",))
PRIORS = Registry("diffusion prior", ("att3d.guidance.priors",))
#: Mesh file formats: ``exporter(mesh: trimesh.Trimesh, path: Path) -> list[Path]`` (the files written). The
#: built-in ones live in one module (importing all of ``att3d.mesh`` for them would be heavy).
EXPORTERS = Registry("mesh format", ("att3d.mesh.export",))
#: Named prompt sets: ``factory() -> list[str]`` (``prompts.train: shapes64_train`` in a config).
PROMPT_SETS = Registry("prompt set", ("att3d.world.prompt_sets",))

__all__ = ["EXPORTERS", "FIELDS", "MAPPINGS", "PRIORS", "PROMPT_SETS", "RENDERERS", "Registry", "TEXT_ENCODERS",
           "import_all", "init_parameters", "to_json_value"]
