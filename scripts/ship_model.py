"""Write a trained model folder's weights in half precision, as the shipped models in ``assets/`` are stored.

Training keeps float32 weights (``RUN/model``: resume, refinement and further stages start from them); what is
shipped is the same model with its floating-point weights rounded to fp16, half the size. ``att3d.load`` converts
them back to float32. Only ``model.safetensors`` and ``model_config.json`` are written (each atomically), so an
existing folder keeps its model card, ``eval/`` and ``samples/``; replacing another model's weights needs
``--overwrite``::

    python scripts/ship_model.py runs/shapes64_polish/model assets/att3d-shapes64 --overwrite

Prints the largest change of the generated conditioning on the 64 captions, so that the rounding is seen to be
harmless before the folder is re-evaluated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32")


def ship(source: str | Path, dest: str | Path, dtype: str = "float16", overwrite: bool = False) -> float:
    """Write ``source``'s model into ``dest`` with weights in ``dtype``; returns the largest absolute change of the
    conditioning (every tensor the mapping generates) over the shapes world's 64 captions."""
    import torch

    import att3d
    from att3d.model import CONFIG_NAME
    from att3d.utils.errors import Att3dError
    from att3d.world.prompt_sets import shapes64

    if dtype not in DTYPES:
        raise Att3dError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise Att3dError(f"{dest} is a file, not a folder")
    if (dest / CONFIG_NAME).exists() and not overwrite:
        raise Att3dError(f"{dest} already holds a model; give --overwrite to replace its weights")
    if Path(source).resolve() == dest.resolve():
        raise Att3dError("the source and the destination are the same folder")
    model = att3d.load(source)
    dest.mkdir(parents=True, exist_ok=True)
    model.write_files(dest, extra=model.config.get("extra"), dtype=getattr(torch, dtype))  # keeps the record
    back = att3d.load(dest)
    prompts = shapes64()
    with torch.no_grad():
        a, b = model.conditioning(prompts), back.conditioning(prompts)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a model folder (e.g. runs/NAME/model)")
    p.add_argument("dest", help="the folder to write the weights and config into (e.g. assets/att3d-shapes64)")
    p.add_argument("--dtype", default="float16", help=f"one of {', '.join(DTYPES)} (default float16)")
    p.add_argument("--overwrite", action="store_true", help="replace the weights of a model already in dest")
    args = p.parse_args(argv)
    from att3d.utils.errors import Att3dError

    try:
        change = ship(args.source, args.dest, args.dtype, args.overwrite)
    except (Att3dError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.dest} ({args.dtype}); largest change of the conditioning on shapes64: {change:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
