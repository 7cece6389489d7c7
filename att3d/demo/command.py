"""``att3d demo``: serve the local web app (gradio) on http://127.0.0.1:7860.

    att3d demo                                   # models under assets/ and runs/, outputs/demo-app/
    att3d demo --port 8000 --model runs/          # another port; the models found under runs/
    att3d demo --model assets/att3d-shapes64 --model runs/quickstart --out /tmp/demo-app
    att3d demo --host 0.0.0.0                     # reachable from the local network (no public link)
"""

from __future__ import annotations

import argparse

from att3d.demo.core import DEFAULT_MODEL_PATHS, DEFAULT_OUT_DIR, KEEP_RUNS, DemoSettings, find_models
from att3d.utils.errors import Att3dError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


class DemoError(Att3dError):
    """``att3d demo`` cannot start as asked."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line :class:`DemoError` s (printed by the ``att3d`` command)."""

    def error(self, message: str):  # type: ignore[override]
        raise DemoError(f"{message} (see '{self.prog} --help')")


DESCRIPTION = ("Serve a local web app (gradio): a prompt becomes a textured, rotatable 3D object in one forward pass "
               "(GLB/OBJ/PLY downloads), two prompts and a slider walk the interpolation between them, and the model "
               "cards are shown. It listens on 127.0.0.1 only unless --host says otherwise, never opens a public link "
               "unless --share, and writes only into --out.")


def build_parser(prog: str = "att3d demo") -> argparse.ArgumentParser:
    # Its own parser: att3d.demo sits below att3d.cli in the package's layers and does not import it.
    p = _Parser(prog=prog, description=DESCRIPTION,
                epilog="Open the printed URL in a browser; Ctrl-C stops the server.")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                                                        "only; 0.0.0.0: the local network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--model", action="append", metavar="PATH",
                   help="a model folder, or a folder to search for model folders; repeatable; the first model "
                        f"found is the default (default: {' and '.join(DEFAULT_MODEL_PATHS)})")
    p.add_argument("--out", default=DEFAULT_OUT_DIR, metavar="DIR",
                   help=f"the app's output folder, the only place it writes (default {DEFAULT_OUT_DIR})")
    p.add_argument("--keep", type=_positive, default=KEEP_RUNS,
                   help=f"request folders kept in --out; older ones are deleted (default {KEEP_RUNS})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--resolution", type=_positive, default=DemoSettings.grid_resolution,
                   help=f"density grid samples per axis of the meshes (default {DemoSettings.grid_resolution})")
    p.add_argument("--texture-size", type=int, default=DemoSettings.texture_size,
                   help=f"texture size; 0: vertex colours only (default {DemoSettings.texture_size})")
    p.add_argument("--queue-size", type=_positive, default=16, help="requests waiting at most (default 16)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link (off by default; needs internet)")
    p.add_argument("--no-preload", action="store_true", help="load the default model on the first request")
    p.add_argument("--quiet", action="store_true", help="less logging")
    return p


def check_port(host: str, port: int) -> None:
    """:class:`DemoError` now, before the model loads, if ``host:port`` cannot be listened on (in use, bad host)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise DemoError(f"--host {host}: {e.strerror or e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise DemoError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port") from None


def main(argv: list[str]) -> int:
    """``att3d demo [--host H] [--port P] [--model PATH ...] [--out DIR]``: serve until Ctrl-C; returns 0."""
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise DemoError(f"--port must be between 1 and 65535, got {args.port}")
    if args.texture_size < 0:
        raise DemoError("--texture-size must be >= 0 (0: vertex colours only)")
    if args.resolution < 8:
        raise DemoError(f"--resolution must be >= 8, got {args.resolution}")
    check_port(args.host, args.port)
    paths = args.model or list(DEFAULT_MODEL_PATHS)
    models = find_models(paths)
    if not models:
        raise DemoError(f"no model folder (model_config.json + model.safetensors) at or under {', '.join(paths)}; "
                        "pass --model PATH")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DemoError(f"--device {args.device} asked for, but CUDA is not available")
    import logging

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="att3d demo: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):  # gradio's own requests to itself
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from att3d.demo.app import build_demo, launch_demo

    settings = DemoSettings(grid_resolution=args.resolution, texture_size=args.texture_size)
    print(f"att3d demo: {len(models)} model{'s' if len(models) != 1 else ''} ({', '.join(models)}); "
          f"loading {next(iter(models))}", flush=True)
    demo = build_demo(models, args.out, settings=settings, device=args.device, preload=not args.no_preload,
                      keep=args.keep)
    print(f"att3d demo: serving http://{args.host}:{args.port} (outputs in {demo.att3d_backend.store.root}); "
          "Ctrl-C stops it", flush=True)
    launch_demo(demo, host=args.host, port=args.port, share=args.share, queue_size=args.queue_size,
                quiet=args.quiet)
    return 0
