"""Mapping networks: text embedding -> per-prompt field conditioning (``MAPPINGS``: hypernetwork, concat, triplane).

Built as ``cls(text_len, text_dim, out_shapes, **cfg)``; ``forward(emb) -> {name: (B, *shape)}``. Every module
of this package is imported when the registry is first used, so a new mapping module needs no line here.
"""

from att3d.mapping.concat import ConcatConditioning
from att3d.mapping.hypernetwork import HyperNetwork, split_outputs, total_size
from att3d.mapping.triplane import TriplaneGenerator

__all__ = ["ConcatConditioning", "HyperNetwork", "TriplaneGenerator", "split_outputs", "total_size"]
