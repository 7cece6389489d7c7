"""``att3d interpolate PROMPT PROMPT [PROMPT ...] --frames 60 --out anim/``: a video (and meshes) along the path."""

from __future__ import annotations

import json
from pathlib import Path

from att3d.cli._args import CommandParser
from att3d.infer.interpolate import MODES
from att3d.utils.errors import Att3dError
from att3d.utils.paths import DEFAULT_MODEL


def build_parser() -> CommandParser:
    ap = CommandParser("interpolate")
    ap.add_argument("prompts", nargs="+", help="two or more prompts, visited in order")
    ap.add_argument("--frames", type=int, default=60, help="frames of the animation (default 60)")
    ap.add_argument("--out", default="anim", help="output folder (default anim/)")
    ap.add_argument("--mode", choices=MODES, default="linear", help="interpolation of the text embeddings")
    ap.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--resolution", type=int, default=128, help="frame size in pixels (default 128)")
    ap.add_argument("--fps", type=float, default=20.0, help="frames per second of the video (default 20)")
    ap.add_argument("--elevation", type=float, default=20.0, help="camera elevation in degrees (default 20)")
    ap.add_argument("--no-orbit", action="store_true", help="keep the camera still instead of orbiting")
    ap.add_argument("--meshes", action="store_true", help="also export a textured mesh per frame (slow)")
    ap.add_argument("--mesh-format", choices=("glb", "obj", "ply"), default="glb")
    ap.add_argument("--mesh-resolution", type=int, default=128, help="marching cubes grid of --meshes")
    ap.add_argument("--texture-size", type=int, default=512, help="texture size of --meshes (0: vertex colours only)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="density threshold of --meshes (default: the model's extraction threshold)")
    ap.add_argument("--batch-size", type=int, default=8, help="frames per forward pass")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``att3d interpolate``: writes ``interpolation.mp4``, ``interpolation.json`` (and ``meshes/``) into ``--out``."""
    args = build_parser().parse_args(argv)
    if len(args.prompts) < 2:
        raise Att3dError("interpolate needs at least 2 prompts")
    if args.frames < max(2, len(args.prompts)):
        raise Att3dError(f"--frames must be at least the number of prompts ({len(args.prompts)}), got {args.frames}")
    for name in ("resolution", "batch_size", "mesh_resolution"):
        if getattr(args, name) < 1:
            raise Att3dError(f"--{name.replace('_', '-')} must be positive")
    if args.texture_size < 0:
        raise Att3dError("--texture-size must be >= 0 (0: vertex colours only)")
    if args.fps <= 0:
        raise Att3dError("--fps must be positive")

    from att3d.infer.interpolate import export_frame_meshes, knot_frames, render_interpolation, write_video
    from att3d.model import load
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder

    ckpt = resolve_model_folder(args.checkpoint)
    model = load(ckpt, device=pick_device(args.device))
    out = Path(args.out)
    frames = render_interpolation(model, args.prompts, args.frames, args.mode, args.resolution, args.elevation,
                                  orbit=not args.no_orbit, batch_size=args.batch_size)
    video = write_video(frames, out / "interpolation.mp4", args.fps)
    written = [video]
    knots = knot_frames(len(args.prompts), args.frames)
    print(f"wrote {video} ({len(frames)} frames, {args.resolution}x{args.resolution}, {args.fps:g} fps)")
    if args.meshes:
        meshes = export_frame_meshes(model, args.prompts, args.frames, args.mode, out / "meshes",
                                     args.mesh_resolution, args.texture_size, args.mesh_format, args.threshold)
        written += meshes
        frames_with_mesh = len({p.stem for p in meshes})
        print(f"wrote {len(meshes)} mesh files for {frames_with_mesh} of {args.frames} frames to {out / 'meshes'}/"
              + (f" ({meshes[0].name} ... {meshes[-1].name})" if meshes else " (no frame has a surface)"))
    info = {"prompts": list(args.prompts), "frames": args.frames, "mode": args.mode, "knot_frames": knots,
            "checkpoint": str(ckpt), "resolution": args.resolution, "fps": args.fps, "orbit": not args.no_orbit,
            "files": [str(p.relative_to(out)) for p in written]}
    (out / "interpolation.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out / 'interpolation.json'} (prompts at frames {', '.join(map(str, knots))})")
    return 0
