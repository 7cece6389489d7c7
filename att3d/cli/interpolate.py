"""``att3d interpolate PROMPT PROMPT [PROMPT ...] --frames 60 --out anim/``: a video (and meshes) along the path.

The prompts are normalised like every prompt (:func:`att3d.text.prompts.normalize_prompts`: an empty one or one with
a control character is an error). A memory estimate (:mod:`att3d.utils.resources`: the frames of ``--resolution``,
the meshes of ``--mesh-resolution`` / ``--texture-size``) is checked before the model loads. Files of an earlier
run in ``--out`` (``interpolation.mp4`` / ``.gif`` / ``.json``, ``meshes/frame_*``) are refused unless
``--overwrite``; every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from att3d.cli._args import CommandParser, add_max_memory
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
    ap.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    add_max_memory(ap)
    return ap


#: Files of a run in ``--out`` (besides ``meshes/frame_*``).
OUTPUT_FILES = ("interpolation.mp4", "interpolation.gif", "interpolation.json")


def existing_output(out: Path, meshes: bool) -> Path | None:
    """The first file of an earlier run in ``out`` that this run would replace (None: none)."""
    for name in OUTPUT_FILES:
        if (out / name).exists():
            return out / name
    if meshes and (out / "meshes").is_dir():
        return next(iter(sorted((out / "meshes").glob("frame_*"))), None)
    return None


def memory_estimate(args):
    """The memory estimate of a run (:mod:`att3d.utils.resources`): its frames, and its meshes with ``--meshes``."""
    from att3d.utils.resources import Estimate, frames_bytes, mesh_estimate

    parts = [(f"--resolution {args.resolution} x {args.frames} frames",
              frames_bytes(args.frames, args.resolution, min(args.batch_size, args.frames)))]
    if args.meshes:
        parts += mesh_estimate(args.mesh_resolution, args.texture_size, min(4, args.frames),
                               grid_option="--mesh-resolution").parts
    return Estimate(tuple(parts))


def main(argv: list[str] | None = None) -> int:
    """``att3d interpolate``: writes ``interpolation.mp4``, ``interpolation.json`` (and ``meshes/``) into ``--out``."""
    args = build_parser().parse_args(argv)
    if len(args.prompts) < 2:
        raise Att3dError("interpolate needs at least 2 prompts")
    from att3d.text.prompts import normalize_prompts

    prompts = normalize_prompts(args.prompts)
    if args.frames < max(2, len(prompts)):
        raise Att3dError(f"--frames must be at least the number of prompts ({len(prompts)}), got {args.frames}")
    for name in ("resolution", "batch_size", "mesh_resolution"):
        if getattr(args, name) < 1:
            raise Att3dError(f"--{name.replace('_', '-')} must be positive")
    if args.texture_size < 0:
        raise Att3dError("--texture-size must be >= 0 (0: vertex colours only)")
    if args.fps <= 0:
        raise Att3dError("--fps must be positive")

    from att3d.infer.interpolate import export_frame_meshes, knot_frames, render_interpolation
    from att3d.infer.video import write_video
    from att3d.model import load
    from att3d.utils.checkpoint import atomic_write
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder
    from att3d.utils.resources import check_memory

    ckpt = resolve_model_folder(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise Att3dError(f"--out {out} is a file, not a folder")
    found = None if args.overwrite else existing_output(out, args.meshes)
    if found is not None:
        raise Att3dError(f"{found} exists (an earlier run's output); add --overwrite to replace it, or choose "
                         "another --out")
    device = pick_device(args.device)
    check_memory(memory_estimate(args), args.max_memory, device)
    model = load(ckpt, device=device)
    frames = render_interpolation(model, prompts, args.frames, args.mode, args.resolution, args.elevation,
                                  orbit=not args.no_orbit, batch_size=args.batch_size)
    video = write_video(frames, out / "interpolation.mp4", args.fps)
    written = [video]
    knots = knot_frames(len(prompts), args.frames)
    print(f"wrote {video} ({len(frames)} frames, {args.resolution}x{args.resolution}, {args.fps:g} fps)")
    del frames
    if args.meshes:
        meshes = export_frame_meshes(model, prompts, args.frames, args.mode, out / "meshes",
                                     args.mesh_resolution, args.texture_size, args.mesh_format, args.threshold)
        written += meshes
        frames_with_mesh = len({p.stem for p in meshes})
        print(f"wrote {len(meshes)} mesh files for {frames_with_mesh} of {args.frames} frames to {out / 'meshes'}/"
              + (f" ({meshes[0].name} ... {meshes[-1].name})" if meshes else " (no frame has a surface)"))
    info = {"prompts": prompts, "frames": args.frames, "mode": args.mode, "knot_frames": knots,
            "checkpoint": str(ckpt), "resolution": args.resolution, "fps": args.fps, "orbit": not args.no_orbit,
            "files": [str(p.relative_to(out)) for p in written]}
    text = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    atomic_write(out / "interpolation.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"wrote {out / 'interpolation.json'} (prompts at frames {', '.join(map(str, knots))})")
    return 0
