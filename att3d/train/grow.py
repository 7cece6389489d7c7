"""Grow a trained model's grid by finer levels, keeping what it computes (coarse-to-fine training).

A hypernetwork model trained with a 32^3 finest level can be continued with a 64^3 level added
(``att3d train init_from=MODEL grow_levels=[64] ...``) instead of being trained again from scratch:
:func:`grow_levels` returns a model whose field has the extra levels and whose outputs are the same as
the trained model's at the start, so that training goes on from where it was.

How the function is kept (the field is :class:`~att3d.field.grid_field.GridField` with ``generated=True``,
the mapping :class:`~att3d.mapping.hypernetwork.HyperNetwork`):

- the hypernetwork's output layer gets one zero row per new grid value (the new levels start at 0) and its
  spectral norm's left vector a zero there, which leaves the layer's top singular value, its power
  iteration and its other outputs as they were;
- its output scale ``output_scale * sqrt(P / hidden_dim)`` grows with the number of outputs P, so
  ``output_scale`` is multiplied by ``sqrt(P_old / P_new)``: the same scale as before;
- the decoder's first layer gets new input columns for the new levels' features. They keep their random
  initialisation, since they multiply features that are 0; were they 0 too, neither they nor the new rows
  would get a gradient;
- each new level's gain starts at the finest old level's.

A grown model still has one spectral norm over all its outputs: as the new rows grow, the top singular value
can grow with them and scale the old levels down, which training then makes up for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from att3d.field import encoding
from att3d.utils.errors import Att3dError

__all__ = ["grow_levels"]


def grow_levels(model, resolutions: Sequence[int]):
    """A copy of ``model`` whose grid field has the levels ``resolutions`` appended, computing the same function.

    Args:
        model: an :class:`~att3d.model.AmortizedModel` with a generated ``grid`` field and the ``hypernetwork``
            mapping.
        resolutions: the new levels' resolutions (vertices per axis), each above the finest existing level, in
            increasing order. The field's ``hashmap_size`` is raised so that they are dense, as every level of
            the shipped configs is.

    Returns:
        a new :class:`~att3d.model.AmortizedModel` (it shares ``model``'s frozen text encoder; ``model`` is not
        changed) whose config records the new resolutions.

    Raises:
        Att3dError: another field or mapping, or resolutions that are not finer than the existing ones.
    """
    from att3d.field.grid_field import GridField
    from att3d.mapping.hypernetwork import HyperNetwork
    from att3d.model import AmortizedModel

    field, mapping = model.field, model.mapping
    if not (isinstance(field, GridField) and field.generated and isinstance(mapping, HyperNetwork)):
        raise Att3dError(f"grow_levels needs a generated grid field and the hypernetwork mapping, not "
                         f"field={model.config['field']['name']} mapping={model.config['mapping']['name']}")
    new = [int(r) for r in resolutions]
    if not new:
        raise Att3dError("grow_levels: no resolutions to add")
    old = list(field.resolutions)
    if any(r < 2 for r in new) or [old[-1], *new] != sorted(set([old[-1], *new])):
        raise Att3dError(f"grow_levels: the new resolutions {new} must increase from above the finest level "
                         f"({old[-1]})")

    cfg = {k: dict(v) for k, v in model.config.items() if k != "extra"}
    all_res = old + new
    hashmap = max(int(cfg["field"]["hashmap_size"]), max(r**3 for r in new))
    cfg["field"].update(resolutions=all_res, num_levels=len(all_res), max_resolution=all_res[-1],
                        hashmap_size=hashmap)
    if encoding.level_layout(old, field.features, hashmap) != field.layout:
        raise Att3dError(f"grow_levels: a hash table of {hashmap} rows would change the existing levels")
    p_old = mapping.out_dim
    p_new = p_old + sum(encoding.dense_level_size(r, field.features) for r in new)
    cfg["mapping"]["output_scale"] = float(mapping.output_scale) * math.sqrt(p_old / p_new)
    with torch.random.fork_rng(devices=[]):  # the new decoder columns' initial values, without touching the
        torch.manual_seed(0)                   # caller's random stream (the trainer seeded it)
        grown = AmortizedModel(cfg, text_encoder=model.text_encoder).to(model.device)

    state, target = model.state_dict(), grown.state_dict()
    rows = _old_rows(mapping.out_shapes, grown.mapping.out_shapes)  # new-output index of every old output
    n_old = len(old) * field.features
    for key, value in target.items():
        src = state[key]
        if key == "field.level_gain":
            value.copy_(torch.cat([src, src[-1:].expand(len(new))]))
        elif key == "field.mlp.0.weight":  # columns: level features, then position / code
            value[:, :n_old] = src[:, :n_old]
            value[:, n_old + len(new) * field.features:] = src[:, n_old:]
        elif key.startswith("mapping.fc2.") and value.shape != src.shape:  # the output rows (weight, its _u)
            value.zero_()
            value[rows] = src
        elif value.shape == src.shape:
            value.copy_(src)
        else:  # an architecture this function does not know how to grow
            raise Att3dError(f"grow_levels: cannot carry {key} {tuple(src.shape)} -> {tuple(value.shape)}")
    if grown.mapping.out_dim != p_new:
        raise Att3dError(f"grow_levels: expected {p_new} hypernetwork outputs, the grown model has "
                         f"{grown.mapping.out_dim}")
    grown.load_state_dict(target)
    return grown.train(model.training)


def _old_rows(old_shapes: dict[str, tuple[int, ...]], new_shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
    """Where each of the old hypernetwork outputs sits among the new ones: every output keeps its name and
    its leading values (the grid's old levels come first in the flat grid)."""
    new_start, start = {}, 0
    for name, shape in new_shapes.items():
        new_start[name] = start
        start += math.prod(shape)
    index = []
    for name, shape in old_shapes.items():
        n = math.prod(shape)
        index.append(torch.arange(n) + new_start[name])
    return torch.cat(index)
