"""``att3d demo``: a local web app (gradio) over trained amortized models.

- :mod:`att3d.demo.core`: everything that is not user interface and needs no gradio: prompt
  validation, the app's own output folder (:class:`OutputStore`), model discovery and the model
  cache, and the handlers (:class:`DemoBackend`: prompt -> mesh files, interpolation frames and
  videos, turntables).
- :mod:`att3d.demo.app`: :func:`build_demo` lays the page out with gradio and wires it to a
  :class:`DemoBackend`.
- :mod:`att3d.demo.command`: the ``att3d demo`` command (``--host``, ``--port``, ``--model``, ``--out``).

Importing this package is cheap: gradio and torch are imported only when a demo is built or run::

    from att3d.demo import build_demo
    demo = build_demo(["assets"], "outputs/demo-app")
    demo.queue(max_size=16).launch(server_name="127.0.0.1", server_port=7860)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from att3d.demo.app import build_demo, launch_demo

__all__ = ["build_demo", "launch_demo"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from att3d.demo import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
