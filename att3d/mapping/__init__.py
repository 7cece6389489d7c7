"""Mapping networks: text embedding -> per-prompt field conditioning (``MAPPINGS``: hypernetwork, concat).

Built as ``cls(text_len, text_dim, out_shapes, **cfg)``; ``forward(emb) -> {name: (B, *shape)}``.
"""

from att3d.mapping.concat import ConcatConditioning, ConcatConditioningConfig
from att3d.mapping.hypernetwork import HyperNetwork, HyperNetworkConfig, split_outputs, total_size

__all__ = ["HyperNetwork", "HyperNetworkConfig", "ConcatConditioning", "ConcatConditioningConfig", "split_outputs",
           "total_size"]
