"""The concat baseline mapping: text embedding -> a vector concatenated to the field's MLP input."""

from __future__ import annotations

import torch
from torch import nn

from att3d.mapping.hypernetwork import split_outputs, text_input, total_size
from att3d.registry import MAPPINGS
from att3d.text.encoders import TextEmbedding


@MAPPINGS.register("concat")
class ConcatConditioning(nn.Module):
    """The comparison variant: a small MLP from the text embedding to a vector that the field
    concatenates to its MLP input (the field's grid is then shared, not generated).

    Args:
        text_len, text_dim: L and D of the token embeddings.
        out_shapes: usually ``{"text": (C,)}`` (any shapes are supported).
        hidden_dim: width of the hidden layer; 0 for a single linear projection.
        use_tokens: read the flattened tokens (True) or the pooled embedding (False, default).
        layer_norm: LayerNorm (no affine) of the input vector.
        output_scale: multiplier of the output.

    Shapes: ``forward(emb)`` with ``emb.pooled (B, text_dim)`` (or ``emb.tokens (B, text_len, text_dim)`` with
    ``use_tokens``) gives ``{name: (B, *shape)}`` for every entry of ``out_shapes``.
    """

    def __init__(self, text_len: int, text_dim: int, out_shapes: dict[str, tuple[int, ...]], hidden_dim: int = 64,
                 use_tokens: bool = False, layer_norm: bool = True, output_scale: float = 1.0):
        super().__init__()
        self.text_len, self.text_dim = int(text_len), int(text_dim)
        self.out_shapes = {k: tuple(int(d) for d in v) for k, v in out_shapes.items()}
        self.use_tokens = bool(use_tokens)
        self.out_dim = total_size(self.out_shapes)
        in_dim = self.text_len * self.text_dim if self.use_tokens else self.text_dim
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False) if layer_norm else nn.Identity()
        if hidden_dim > 0:
            self.net: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.SiLU(),
                                                nn.Linear(hidden_dim, self.out_dim))
        else:
            self.net = nn.Linear(in_dim, self.out_dim)
        self.output_scale = float(output_scale)

    def forward(self, emb: TextEmbedding) -> dict[str, torch.Tensor]:
        """TextEmbedding (B prompts) -> ``{name: (B, *shape)}``."""
        x = text_input(emb, self.use_tokens, self.text_len, self.text_dim)
        return split_outputs(self.net(self.norm(x)) * self.output_scale, self.out_shapes)
