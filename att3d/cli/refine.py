"""``att3d refine PROMPT --steps N --out DIR``: refine a trained model on one prompt (or optimise from scratch),
then export its mesh and turntable as ``att3d generate`` does and save the refined model folder and its curve.

The SDS schedule comes from the guidance config (:func:`att3d.config.guidance_config`): its ``refine:`` block
when refining from the amortized start, the options ``--guidance-scale``, ``--guidance-scale-low``, ``--low-t``,
``--t-max`` and ``--lr-final`` above it (:func:`refine_schedule`).

Before any work: the prompt is normalised like every prompt (:func:`att3d.text.prompts.normalize_prompt`), files
of an earlier run in ``--out`` (``model/``, ``history.json``, the prompt's mesh and video) are refused unless
``--overwrite``, and a memory estimate (:mod:`att3d.utils.resources`: the SDS renders of ``--resolution`` x
``--batch-views``, the mesh of ``--grid-resolution`` / ``--texture-size``) is checked against the available memory
(or ``--max-memory``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from att3d.cli._args import CommandParser, add_max_memory
from att3d.train.refine import MODES, SDS_KEYS
from att3d.utils.errors import Att3dError
from att3d.utils.paths import DEFAULT_MODEL


def refine_schedule(name_or_path: str = "shapes", from_scratch: bool = False,
                    overrides: dict[str, float | None] | None = None) -> dict[str, float | None]:
    """The SDS schedule of one run from the guidance config ``name_or_path`` (a name in ``configs/guidance/`` or a
    YAML file): :func:`att3d.train.refine.schedule_from_config` of :func:`att3d.config.guidance_config`."""
    from att3d.config import guidance_config
    from att3d.train.refine import schedule_from_config

    return schedule_from_config(guidance_config(name_or_path), from_scratch, overrides, source=name_or_path)


def load_guidance(name_or_path: str = "shapes", prior: str | None = None, device: Any = "cpu",
                  guidance_scale: float | None = None, **sds: float | None):
    """``(ScoreDistillation, background)`` of a guidance config; ``guidance_scale`` and ``sds``
    (``guidance_scale_low``, ``low_t``; None: keep the config's) override the config's values."""
    from att3d.config import background_of, build_guidance, guidance_config

    if guidance_scale is not None and not guidance_scale > 0:
        raise Att3dError(f"--guidance-scale must be positive, got {guidance_scale}")
    unknown = set(sds) - set(SDS_KEYS)
    if unknown:
        raise TypeError(f"load_guidance() got unexpected arguments {sorted(unknown)}")
    gcfg = guidance_config(name_or_path, prior)
    overrides = {k: float(v) for k, v in {"guidance_scale": guidance_scale, **sds}.items() if v is not None}
    return build_guidance(gcfg, str(device), **overrides), background_of(gcfg)


def export_refined(refined, out_dir: str | Path, format: str = "glb", grid_resolution: int = 128,
                   texture_size: int = 512, turntable: bool = True, threshold: float | None = None,
                   device: Any = "cpu", progress: bool = True, exists: str = "overwrite") -> list[dict[str, Any]]:
    """Mesh (and turntable video) of the refined prompt, written by :func:`att3d.infer.generate.write_outputs`
    exactly as ``att3d generate`` writes them (``<slug>.<format>``, ``<slug>.mp4``); ``exists`` is
    ``write_outputs``' (``error``: refuse files that exist).

    Returns:
        ``write_outputs``' rows (one: ``files``, ``empty``, ``note``, ...).
    """
    import torch

    from att3d.infer.generate import write_outputs
    from att3d.mesh.extract import meshes_from_conditioning

    with torch.no_grad():
        cond = refined.conditioning([refined.prompt])
    meshes = meshes_from_conditioning(refined, cond, grid_resolution=grid_resolution, threshold=threshold,
                                      texture_size=texture_size)
    return write_outputs(meshes, [refined.prompt], out_dir, format=format, turntable=turntable, device=device,
                         progress=progress, exists=exists)


def build_parser() -> CommandParser:
    ap = CommandParser("refine")
    ap.add_argument("prompt", help="the prompt to refine")
    ap.add_argument("--steps", type=int, default=200, help="SDS steps (default 200)")
    ap.add_argument("--out", default="refined", help="output folder (default refined/)")
    ap.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--mode", choices=MODES, default="params",
                    help="params: the prompt's field conditioning (+ field MLP); model: the whole model")
    ap.add_argument("--from-scratch", action="store_true",
                    help="baseline: a freshly initialised model of the same architecture instead of the trained one")
    ap.add_argument("--guidance", default="shapes", help="guidance config name (configs/guidance/) or YAML file")
    ap.add_argument("--prior", default=None, help="prior folder (overrides the guidance config's prior.path)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the guidance config's refine.guidance_scale "
                         "when refining, else its guidance_scale)")
    ap.add_argument("--guidance-scale-low", type=float, default=None,
                    help="guidance scale of the low-noise steps (t <= --low-t T; default: the config's refine block)")
    ap.add_argument("--low-t", type=float, default=None, help="boundary of --guidance-scale-low, fraction of T")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-2 params, 1e-3 model)")
    ap.add_argument("--field-lr", type=float, default=None, help="learning rate of the field MLP")
    ap.add_argument("--lr-final", type=float, default=None,
                    help="learning rates decay (cosine) to this fraction at the end (default: the guidance config's "
                         "refine.lr_final when refining, else 1 = constant)")
    ap.add_argument("--t-max", type=float, default=None,
                    help="upper end of the SDS timestep range as a fraction of T (default: the guidance config's "
                         "refine.t_max when refining, else its own range)")
    ap.add_argument("--freeze-field", action="store_true", help="params mode: keep the shared field MLP fixed")
    ap.add_argument("--resolution", type=int, default=32, help="render resolution of the SDS steps")
    ap.add_argument("--batch-views", type=int, default=4, help="random views per step")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="shapes-world captions: score the object every N steps (0: at start and end only)")
    ap.add_argument("--no-eval", action="store_true", help="do not score shapes-world captions")
    ap.add_argument("--format", choices=("glb", "obj", "ply"), default="glb", help="mesh format")
    ap.add_argument("--grid-resolution", type=int, default=128, help="marching cubes grid of the mesh")
    ap.add_argument("--texture-size", type=int, default=512, help="texture size of the mesh (0: vertex colours only)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="density threshold of the mesh (default: the model's extraction threshold)")
    ap.add_argument("--no-turntable", action="store_true", help="do not render the turntable video")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    ap.add_argument("--overwrite", action="store_true", help="replace the files of an earlier run in --out")
    add_max_memory(ap)
    return ap


def existing_output(out: Path, prompt: str, format: str, turntable: bool) -> Path | None:
    """The first file of an earlier run in ``out`` that refining ``prompt`` would replace (None: none)."""
    from att3d.infer.generate import OutputFolder, slugify

    if not out.is_dir():
        return None
    candidates = [out / "model", out / "history.json"]
    candidates += OutputFolder(out, format=format, turntable=turntable).targets(slugify(prompt))
    return next((f for f in candidates if f.exists()), None)


def memory_estimate(args: Any, samples_per_ray: int):
    """The memory estimate of a run (:mod:`att3d.utils.resources`): the SDS renders with gradients and the mesh."""
    from att3d.utils.resources import Estimate, mesh_estimate, render_training_bytes

    parts = [(f"--resolution {args.resolution} x {args.batch_views} views x {samples_per_ray} samples per ray",
              render_training_bytes(args.resolution, args.batch_views, samples_per_ray))]
    parts += mesh_estimate(args.grid_resolution, args.texture_size, 1, 0 if args.no_turntable else 48, 256,
                           grid_option="--grid-resolution").parts
    return Estimate(tuple(parts))


def samples_per_ray(model: Any) -> int:
    """Samples per ray of the model's training renders (``renderer.num_samples`` + ``num_importance``)."""
    cfg = (getattr(model, "config", None) or {}).get("renderer") or {}
    return int(cfg.get("num_samples", 64) or 64) + int(cfg.get("num_importance", 0) or 0)


def main(argv: list[str] | None = None) -> int:
    """``att3d refine PROMPT --steps N --out DIR``: refine (or optimise from scratch), export, save."""
    args = build_parser().parse_args(argv)
    if args.steps < 0:
        raise Att3dError(f"--steps must be >= 0, got {args.steps}")
    for name in ("resolution", "batch_views", "grid_resolution"):
        if getattr(args, name) < 1:
            raise Att3dError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.texture_size < 0:
        raise Att3dError(f"--texture-size must be >= 0 (0: vertex colours only), got {args.texture_size}")
    from att3d.text.prompts import PromptError, normalize_prompt

    try:
        args.prompt = normalize_prompt(args.prompt)
    except PromptError as e:
        raise PromptError(f"prompt: {e}") from None

    from att3d.eval.refine_eval import is_shapes_caption, shapes_eval_fn
    from att3d.model import load
    from att3d.train.refine import from_scratch, refine
    from att3d.utils.checkpoint import atomic_write
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder
    from att3d.utils.resources import check_memory

    device = pick_device(args.device)
    ckpt = resolve_model_folder(args.checkpoint)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise Att3dError(f"--out {out} is a file, not a folder")
    found = None if args.overwrite else existing_output(out, args.prompt, args.format, not args.no_turntable)
    if found is not None:
        raise Att3dError(f"{found} exists (an earlier run's output); add --overwrite to replace it, or choose "
                         "another --out")
    model = load(ckpt, device=device)
    check_memory(memory_estimate(args, samples_per_ray(model)), args.max_memory, device)
    schedule = refine_schedule(args.guidance, from_scratch=args.from_scratch,
                               overrides={"guidance_scale": args.guidance_scale, "t_max": args.t_max,
                                          "lr_final": args.lr_final, "guidance_scale_low": args.guidance_scale_low,
                                          "low_t": args.low_t})
    guidance, background = load_guidance(args.guidance, args.prior, device, **{k: schedule[k] for k in SDS_KEYS})
    eval_fn = None
    if not args.no_eval and is_shapes_caption(args.prompt):
        eval_fn = shapes_eval_fn(args.prompt)
    kwargs = dict(mode=args.mode, lr=args.lr, field_lr=args.field_lr, lr_final=schedule["lr_final"],
                  t_max=schedule["t_max"], train_field=not args.freeze_field, resolution=args.resolution,
                  batch_views=args.batch_views, seed=args.seed, eval_fn=eval_fn, eval_every=args.eval_every,
                  background=background)
    if args.from_scratch:
        refined, history = from_scratch(model, args.prompt, args.steps, guidance, **kwargs)
    else:
        refined, history = refine(model, args.prompt, args.steps, guidance, **kwargs)

    out.mkdir(parents=True, exist_ok=True)
    folder = refined.save_pretrained(out / "model", extra={"checkpoint": str(ckpt)})
    text = json.dumps(history.to_dict(), indent=2) + "\n"
    atomic_write(out / "history.json", lambda tmp: Path(tmp).write_text(text))
    print(f"{'optimised from scratch' if args.from_scratch else 'refined'} {refined.prompt!r}: {args.steps} steps "
          f"({args.mode} mode) in {history.seconds:.1f} s")
    if history.evals:
        first, last = history.evals[0], history.evals[-1]
        print("  " + ", ".join(f"{k}: {first[k]:.3f} -> {last[k]:.3f}" for k in first if k != "step"))
    print(f"wrote {folder}/ (refined model) and {out / 'history.json'}")
    rows = export_refined(refined, out, format=args.format, grid_resolution=args.grid_resolution,
                          texture_size=args.texture_size, turntable=not args.no_turntable,
                          threshold=args.threshold, device=device, exists="overwrite")
    for row in rows:
        for f in row["files"]:
            print(f"wrote {f}")
        if row["empty"]:
            print(f"no mesh written: {row['note']}")
    return 0
