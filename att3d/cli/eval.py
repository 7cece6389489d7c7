"""``att3d eval prior | model | paraphrase``: quality against the shapes world's ground truth.

- ``att3d eval prior`` (:func:`prior_main`): samples of the shapes-world diffusion prior against the ground-truth
  renders of their captions (:mod:`att3d.eval.prior_eval`).
- ``att3d eval model`` (:func:`model_main`): an amortized model on seen and held-out prompts
  (:mod:`att3d.eval.model_eval`).
- ``att3d eval paraphrase`` (:func:`paraphrase_main`): an amortized model on reworded prompts, or with
  ``--set unseen [--split dev|final|both]`` on prompts with words outside the world's vocabulary
  (:mod:`att3d.eval.paraphrase`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from att3d.cli._args import CommandParser, UsageError
from att3d.utils.paths import DEFAULT_MODEL

# ---------------------------------------------------------------------------------------------------------------
# att3d eval prior
# ---------------------------------------------------------------------------------------------------------------


def prior_parser() -> CommandParser:
    from att3d.eval.prior_eval import (
        DEFAULT_ETA,
        DEFAULT_GUIDANCE_INTERVAL,
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_RESTART_T,
        DEFAULT_RESTARTS,
        DEFAULT_SPACING,
        DEFAULT_STEPS,
    )

    parser = CommandParser("eval prior")
    parser.add_argument("--prior", default=None,
                        help="prior folder (prior_config.json, unet/, scheduler/); default: $ATT3D_SHAPES_PRIOR "
                             "or assets/shapes-prior")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps (default {DEFAULT_STEPS})")
    parser.add_argument("--eta", type=float, default=DEFAULT_ETA,
                        help=f"DDIM eta: 0 deterministic, 1 ancestral (default {DEFAULT_ETA})")
    parser.add_argument("--restarts", type=int, default=DEFAULT_RESTARTS,
                        help=f"restart rounds after the trajectory (default {DEFAULT_RESTARTS}; 0: plain DDIM)")
    parser.add_argument("--restart-t", type=float, default=DEFAULT_RESTART_T,
                        help=f"noise level of each restart as a fraction of T (default {DEFAULT_RESTART_T})")
    parser.add_argument("--spacing", choices=("leading", "trailing", "linspace"), default=DEFAULT_SPACING,
                        help=f"DDIM timestep grid (default {DEFAULT_SPACING}: the first step at t = T - 1)")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                        help=f"classifier-free guidance (default {DEFAULT_GUIDANCE_SCALE})")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=DEFAULT_GUIDANCE_INTERVAL,
                        metavar=("LO", "HI"),
                        help="apply guidance only to the steps with LO T <= t <= HI T (default "
                             f"{DEFAULT_GUIDANCE_INTERVAL[0]:g} {DEFAULT_GUIDANCE_INTERVAL[1]:g}; 0 1: every step)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples denoised together (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="evaluate N evenly spaced captions of the 64 (default: all 64)")
    parser.add_argument("--wordings", action="store_true",
                        help="prompt each view with another of the object's wordings (WORLD.md's vocabulary) "
                             "instead of its caption")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prior_main(argv: list[str]) -> int:
    """``att3d eval prior --prior DIR --out DIR [--steps 25] [--eta 1] [--spacing trailing] [--guidance-scale 3]
    [--guidance-interval 0 0.6] [--restarts 0] [--restart-t 0.5] [--batch-size 64] [--seed 0] [--prompts N]``:
    writes ``metrics.json``, ``metrics.md`` and ``samples.png`` into ``--out``."""
    parser = prior_parser()
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if not 0.0 <= args.eta <= 1.0:
        parser.error("--eta must be in [0, 1]")
    if args.restarts < 0:
        parser.error("--restarts must be >= 0")
    if not 0.0 < args.restart_t < 1.0:
        parser.error("--restart-t must be in (0, 1)")
    if args.prompts is not None and args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if not 0.0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1.0:
        parser.error("--guidance-interval needs 0 <= LO <= HI <= 1")

    import numpy as np
    import torch
    from PIL import Image

    from att3d.eval.prior_eval import GRID_PROMPTS, evaluate, markdown_report, sample_grid, select_prompts
    from att3d.guidance.priors.shapes import ShapesPrior, default_shapes_prior_path
    from att3d.utils.checkpoint import save_json
    from att3d.utils.devices import pick_device
    from att3d.world.shapes import all_objects

    device = str(pick_device(args.device))
    prior_path = Path(args.prior) if args.prior else default_shapes_prior_path()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    prior = ShapesPrior.from_pretrained(prior_path, device=device)
    indices = select_prompts(args.prompts)
    result, samples, gt = evaluate(prior, indices, steps=args.steps, guidance_scale=args.guidance_scale,
                                   batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
                                   eta=args.eta, restarts=args.restarts, restart_t=args.restart_t,
                                   timestep_spacing=args.spacing,
                                   guidance_interval=tuple(args.guidance_interval), wordings=args.wordings)
    result = {
        "settings": {"prior": str(prior_path), "steps": args.steps, "eta": args.eta,
                     "restarts": args.restarts, "restart_t": args.restart_t, "spacing": args.spacing,
                     "guidance_interval": list(args.guidance_interval),
                     "guidance_scale": args.guidance_scale,
                     "batch_size": args.batch_size, "seed": args.seed, "device": device,
                     "wordings": args.wordings},
        **result,
        "elapsed_s": round(time.time() - t0, 2),
    }
    save_json(out / "metrics.json", result)
    (out / "metrics.md").write_text(markdown_report(result))

    shown = [int(i) for i in np.unique(np.linspace(0, len(indices) - 1, min(GRID_PROMPTS, len(indices))).round())]
    captions = [all_objects()[indices[i]].caption for i in shown]
    gt_rgb = gt["rgb"][torch.tensor([indices[i] for i in shown])]
    scale = max(1, 64 // int(prior.resolution))
    Image.fromarray(sample_grid(samples[shown], gt_rgb, captions, scale)).save(out / "samples.png")

    m = result["mean"]
    print(f"prior {prior_path}: silhouette IoU {m['silhouette_iou']:.3f}, colour error {m['colour_error']:.3f}, "
          f"retrieval {m['retrieval_accuracy']:.3f} ({result['n_prompts']} prompts x {result['n_views']} views)")
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'}, {out / 'samples.png'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# att3d eval model
# ---------------------------------------------------------------------------------------------------------------

def model_parser() -> CommandParser:
    from att3d.mesh.extract import SURFACES
    from att3d.mesh.marching_cubes import METHODS as ISO_METHODS

    ap = CommandParser("eval model")
    ap.add_argument("--checkpoint", required=True, help="model folder (att3d train's run_dir/model or a shipped one)")
    ap.add_argument("--prompts", default="shapes64", help="prompt set name or file (shapes-world captions)")
    ap.add_argument("--heldout", default="shapes64_heldout", help="prompts reported as held out")
    ap.add_argument("--out", default=None, help="output folder (default: <checkpoint>/eval)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=None, help="density threshold of occupancy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--meshes", action="store_true", help="also export each GLB (to OUT/meshes) and score it")
    ap.add_argument("--head", choices=("auto", "nerf", "mesh"), default="auto",
                    help="with --meshes: the surface exported (auto: the mesh stage's if the model has one)")
    ap.add_argument("--iso", choices=ISO_METHODS, default="lewiner",
                    help="with --meshes: the iso-surface (lewiner: marching cubes; tets: marching tetrahedra)")
    ap.add_argument("--faces", type=int, default=20_000, help="with --meshes: the face budget (0: no limit)")
    ap.add_argument("--no-solid", action="store_true", help="with --meshes: do not fill hidden cavities")
    ap.add_argument("--surface", choices=SURFACES, default="opacity",
                    help="with --meshes: the exported surface (opacity: trimmed to what the field's renders show; "
                         "density: the iso-surface at the threshold alone)")
    return ap


def model_main(argv: list[str] | None = None) -> int:
    """``att3d eval model``: score a model folder on shapes-world prompts."""
    args = model_parser().parse_args(argv)

    from att3d.eval.model_eval import evaluate, markdown_report, write_report
    from att3d.model import load
    from att3d.text.prompts import resolve_prompts
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder

    folder = resolve_model_folder(args.checkpoint)
    model = load(folder, device=pick_device(args.device))
    prompts = resolve_prompts(args.prompts)
    heldout = resolve_prompts(args.heldout) if args.heldout else []
    out = Path(args.out) if args.out else folder / "eval"
    if args.faces < 0:
        raise UsageError(f"--faces must be >= 0 (0: no limit), got {args.faces}")
    res = evaluate(model, prompts, heldout, args.resolution, threshold=args.threshold,
                   mesh_dir=out / "meshes" if args.meshes else None,
                   mesh_kw={"head": args.head, "iso_method": args.iso, "max_faces": args.faces,
                            "solid": not args.no_solid, "surface": args.surface})
    write_report(res, prompts, out)
    print(markdown_report(res), end="")
    print(f"wrote {out}/metrics.json, metrics.md, renders.png")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# att3d eval paraphrase
# ---------------------------------------------------------------------------------------------------------------

def paraphrase_parser() -> CommandParser:
    from att3d.eval.paraphrase import DEFAULT_TABLE, KINDS, SETS, UNSEEN_KINDS, UNSEEN_TABLE

    ap = CommandParser("eval paraphrase")
    ap.add_argument("--checkpoint", default=DEFAULT_MODEL, help=f"model folder (default {DEFAULT_MODEL})")
    ap.add_argument("--set", choices=tuple(SETS), default="paraphrases",
                    help=f"paraphrases (default: {DEFAULT_TABLE}); unseen: prompts with words outside the world's "
                         f"vocabulary, in a dev and a final split ({UNSEEN_TABLE}); wordings: the 720 wordings of "
                         "the 8 held-out objects (WORLD.md's vocabulary, generated; kind = template)")
    ap.add_argument("--split", choices=("dev", "final", "both"), default=None,
                    help="with --set unseen: dev (choose settings on it), final (the final figure: score it once) "
                         "or both, reported apart (default both)")
    ap.add_argument("--paraphrases", default=None,
                    help="the set's file instead of its default, prompt<TAB>caption<TAB>kind[<TAB>split] per line")
    ap.add_argument("--out", default=None,
                    help="output folder (default: <checkpoint>/eval/paraphrase; --set unseen, wordings: "
                         ".../eval/unseen, .../eval/wordings)")
    ap.add_argument("--max-prompts", type=int, default=0,
                    help="score at most N paraphrases (with --set unseen: N per split), spread evenly over every "
                         "kind (with --set wordings: over every held-out object and template) (default 0: all)")
    ap.add_argument("--kinds", nargs="+", default=None,
                    help=f"only these kinds (paraphrases: {', '.join(KINDS)}; unseen: {', '.join(UNSEEN_KINDS)}; "
                         "wordings: the templates, e.g. 'a {shape} that is {colour}')")
    ap.add_argument("--no-canonical", action="store_true", help="do not score the canonical captions for comparison")
    ap.add_argument("--resolution", type=int, default=64, help="render resolution of the evaluation views")
    ap.add_argument("--threshold", type=float, default=None, help="density threshold of occupancy")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--write-table", default=None, metavar="FILE",
                    help="write the set's generated table to FILE and exit")
    return ap


def paraphrase_main(argv: list[str] | None = None) -> int:
    """``att3d eval paraphrase``: score reworded prompts against their objects."""
    args = paraphrase_parser().parse_args(argv)

    from att3d.eval.paraphrase import (
        SETS,
        ParaphraseError,
        build_set,
        evaluate_paraphrases,
        format_table,
        read_table,
        report,
        select,
        select_per_object,
    )

    if args.split is not None and args.set != "unseen":
        raise UsageError("--split needs --set unseen (the paraphrase table has no dev/final split)")
    split = args.split or "both"
    if args.write_table:
        Path(args.write_table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write_table).write_text(format_table(build_set(args.set)))
        print(f"wrote {args.write_table}")
        return 0
    if args.max_prompts < 0:
        raise ParaphraseError(f"--max-prompts must be >= 0, got {args.max_prompts}")

    from att3d.model import load
    from att3d.utils.devices import pick_device
    from att3d.utils.paths import resolve_model_folder, resolve_path

    source = args.paraphrases or SETS[args.set]
    table = read_table(resolve_path(source)) if source else build_set(args.set)
    source = source or f"generated ({args.set})"
    if args.set == "unseen":
        if not all(p.subset for p in table):
            raise ParaphraseError(f"{source} has no split column (prompt<TAB>caption<TAB>kind<TAB>dev|final)")
        if split != "both":
            table = [p for p in table if p.subset == split]
            if not table:
                raise ParaphraseError(f"no prompts of split {split!r} in {source}")
    if args.kinds:
        unknown = sorted(set(args.kinds) - {p.kind for p in table})
        if unknown:
            raise ParaphraseError(f"no paraphrases of kind {', '.join(map(repr, unknown))} in {source}")
        table = [p for p in table if p.kind in set(args.kinds)]
    chosen = select_per_object(table, args.max_prompts) if args.set == "wordings" else select(table, args.max_prompts)
    ckpt = resolve_model_folder(args.checkpoint)
    model = load(ckpt, device=pick_device(args.device))
    result = evaluate_paraphrases(model, chosen, args.resolution, args.batch_size, args.threshold,
                                  canonical=not args.no_canonical)
    out = Path(args.out) if args.out else ckpt / "eval" / ("paraphrase" if args.set == "paraphrases" else args.set)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(args.checkpoint), "set": args.set, "paraphrases": str(source),
                "max_prompts": args.max_prompts, "kinds": args.kinds, "resolution": args.resolution,
                "threshold": args.threshold}
    if args.set == "unseen":
        settings["split"] = split
    (out / "paraphrase.json").write_text(json.dumps({"settings": settings, **result}, indent=1) + "\n")
    text = report(result)
    (out / "paraphrase.md").write_text(text)
    print(text, end="")
    print(f"wrote {out}/paraphrase.json, paraphrase.md")
    return 0
