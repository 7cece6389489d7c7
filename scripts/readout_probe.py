"""How much of an unseen word's meaning can a mapping trained on the wordings read out of a text encoder? A probe.

Issue #17 asks which encoder, and which of its outputs (the token matrix or the pooled embedding), the mapping
network should read. Training a 3D model per choice costs an hour of CPU each; this probe asks the same question
of the encoder alone, in seconds: two linear classifiers (shape, colour; 8 classes each, multinomial logistic
regression with L2 weight decay, L-BFGS) are trained on the 5,040 training wordings of WORLD.md's vocabulary (the
56 training objects: what the amortized model trains on) and tested on the **dev** split of the unseen-word set
(``configs/prompts/shapes64_unseen.txt``; the final split is not read here). A prompt is right when both heads are.
Inputs (each standardised per feature on the training wordings):

- ``pooled``: the encoder's pooled embedding (mean over the real tokens, L2-normalised), D values;
- ``tokens``: the token matrix (L x D, padding zeroed), flattened, what the hypernetwork reads;
- ``layer K``: the mean over the real tokens of the encoder's hidden state after layer K (0: the input word
  embeddings), D values: whether an earlier layer keeps more of a word's meaning than the last one (session 13).

A linear read-out is what the hypernetwork's first layer is, so the probe bounds from above what that layer can
recover of unseen words from what the training wordings teach it (the 3D model adds its own errors). Weight decay
is chosen on the dev split (the figures of every setting are reported). Writes ``probe.json`` and ``probe.md``::

    python scripts/readout_probe.py --out docs/results/encoders --encoders minilm mpnet
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)


@torch.no_grad()
def embed(encoder, prompts: list[str], batch_size: int = 256) -> dict[str, torch.Tensor]:
    """One pass of the encoder over ``prompts``: pooled (N, D), flattened masked tokens (N, L D) and ``layer K``
    (N, D), each hidden state (K = 0: the embeddings) averaged over the real tokens."""
    hidden: list[tuple[torch.Tensor, ...]] = []
    hook = encoder.model.register_forward_hook(lambda module, args, out: hidden.append(out.hidden_states))
    keep = encoder.model.config.output_hidden_states
    encoder.model.config.output_hidden_states = True
    try:
        outs = [encoder(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    finally:
        hook.remove()
        encoder.model.config.output_hidden_states = keep
    tokens = torch.cat([o.tokens for o in outs])
    mask = torch.cat([o.mask for o in outs]).to(tokens.dtype)
    x = {"pooled": torch.cat([o.pooled for o in outs]), "tokens": (tokens * mask[..., None]).flatten(1)}
    for k in range(len(hidden[0])):
        states = torch.cat([h[k].float() for h in hidden])
        x[f"layer {k}"] = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return x


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float,
               iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS: weights (D, classes), bias (classes,)."""
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + weight_decay * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe(name: str, max_length: int) -> dict[str, Any]:
    from att3d.eval.paraphrase import build_unseen
    from att3d.registry import TEXT_ENCODERS
    from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES
    from att3d.world.wordings import train_wordings, wordings_by_object

    torch.manual_seed(0)
    encoder = TEXT_ENCODERS.build(name, max_length=max_length)
    dev = [p for p in build_unseen() if p.subset == "dev"]
    train = train_wordings()
    owner = wordings_by_object()

    def labels(objs: list) -> dict[str, torch.Tensor]:
        return {"shape": torch.tensor([SHAPE_NAMES.index(o.shape) for o in objs]),
                "colour": torch.tensor([COLOUR_NAMES.index(o.colour) for o in objs])}

    y_train, y_dev = labels([owner[w] for w in train]), labels([p.obj for p in dev])
    t0 = time.time()
    x_train, x_dev = embed(encoder, train), embed(encoder, [p.prompt for p in dev])
    embed_s = time.time() - t0
    rows = []
    for kind in x_train:
        mu, sd = x_train[kind].mean(0), x_train[kind].std(0) + 1e-6
        xt, xd = (x_train[kind] - mu) / sd, (x_dev[kind] - mu) / sd
        for wd in WEIGHT_DECAYS:
            right = {}
            for head in ("shape", "colour"):
                w, b = fit_linear(xt, y_train[head], 8, wd)
                right[head] = (xd @ w + b).argmax(1) == y_dev[head]
            rows.append({"input": kind, "dim": int(xt.shape[1]), "weight_decay": wd,
                         "object": float((right["shape"] & right["colour"]).float().mean()),
                         "shape": float(right["shape"].float().mean()),
                         "colour": float(right["colour"].float().mean())})
    return {"max_length": max_length, "dev_prompts": len(dev), "train_wordings": len(train),
            "embed_s": round(embed_s, 1), "rows": rows}


def markdown(results: dict[str, Any], command: str) -> str:
    header = ["| encoder | input | dim | weight decay | object | shape | colour |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines = ["# Read-out probe: unseen words from the training wordings (dev split)", "",
             "Linear shape and colour classifiers trained on the 5,040 training wordings' embeddings and tested on "
             "the 128 dev prompts of the unseen-word set (see `scripts/readout_probe.py`; the final split is not "
             "read). `object`: both heads right. Best weight decay per input in bold.", "", *header]
    per_layer = ["", "Per layer (the mean of each hidden state over the real tokens; 0: the input embeddings), "
                 "the best weight decay of each:", "", *header]
    for name, r in results["encoders"].items():
        if "rows" not in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | |")
            continue
        inputs = list(dict.fromkeys(x["input"] for x in r["rows"]))
        best = {k: max((x for x in r["rows"] if x["input"] == k), key=lambda x: x["object"]) for k in inputs}
        for x in r["rows"]:
            layer = x["input"].startswith("layer")
            if layer and x is not best[x["input"]]:
                continue
            b = "**" if x is best[x["input"]] and not layer else ""
            (per_layer if layer else lines).append(
                f"| {name} | {x['input']} | {x['dim']} | {x['weight_decay']:g} | {b}{100 * x['object']:.1f}%{b} | "
                f"{100 * x['shape']:.1f}% | {100 * x['colour']:.1f}% |")
    if len(per_layer) > 4:
        lines += per_layer
    lines += ["", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", nargs="+", default=["minilm"])
    ap.add_argument("--max-length", type=int, default=16, help="tokens per prompt (the models' 16)")
    ap.add_argument("--out", default="docs/results/encoders")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from att3d.text.encoders import TextEncoderUnavailable

    out = Path(args.out)
    path = out / "probe.json"
    results = json.loads(path.read_text()) if path.is_file() else {"encoders": {}}
    for name in args.encoders:
        try:
            results["encoders"][name] = probe(name, args.max_length)
        except TextEncoderUnavailable as e:
            results["encoders"][name] = {"skipped": str(e)}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    command = "python scripts/readout_probe.py --out " + str(args.out) + " --encoders " + " ".join(results["encoders"])
    (out / "probe.md").write_text(markdown(results, command))
    print((out / "probe.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
