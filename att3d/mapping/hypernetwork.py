"""The ATT3D hypernetwork: text embedding -> per-prompt field grid (and shared mapping helpers).

Both mappings are built as ``cls(text_len, text_dim, out_shapes, **cfg)`` and map a
:class:`~att3d.text.encoders.TextEmbedding` to ``{name: (B, *shape)}`` for every entry of
``out_shapes`` (which the field declares in ``conditioning_shapes()``). Inputs are plain
tensors, so interpolated (mixed) embeddings are just another input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from att3d.registry import MAPPINGS
from att3d.text.encoders import TextEmbedding


def total_size(out_shapes: dict[str, tuple[int, ...]]) -> int:
    """P: the number of values of all outputs together."""
    return sum(math.prod(tuple(s)) for s in out_shapes.values())


def split_outputs(flat: torch.Tensor, out_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Cut (B, P) into ``{name: (B, *shape)}`` in the order of ``out_shapes``."""
    out = {}
    start = 0
    for name, shape in out_shapes.items():
        n = math.prod(tuple(shape))
        out[name] = flat[:, start:start + n].reshape(flat.shape[0], *shape)
        start += n
    return out


def text_input(emb: TextEmbedding, use_tokens: bool, text_len: int, text_dim: int) -> torch.Tensor:
    """The vector a mapping reads: flattened tokens (B, L*D) or the pooled embedding (B, D)."""
    if use_tokens:
        B, L, D = emb.tokens.shape
        if (L, D) != (text_len, text_dim):
            raise ValueError(
                f"mapping expects tokens of shape (B, {text_len}, {text_dim}), got {tuple(emb.tokens.shape)}")
        return emb.tokens.reshape(B, L * D)
    if emb.pooled.shape[-1] != text_dim:
        raise ValueError(f"mapping expects pooled embeddings of width {text_dim}, got {emb.pooled.shape[-1]}")
    return emb.pooled


def spectral_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a linear layer under torch's ``spectral_norm`` parametrization, dividing the output.

    The parametrization returns ``W / sigma`` (``sigma = u . W v``, the power iteration's estimate of the top
    singular value, with its gradient), a pass over the whole weight forward and three backward; for the
    hypernetwork's output layer (P x hidden, 5-10M values) those passes cost more than the matrix product.
    ``x W^T / sigma`` is the same value and gradient with the division on the (B, P) output. The power iteration
    (training mode) and the ``u``, ``v`` buffers are the parametrization's own, so files and ``layer.weight``
    are unchanged.

    Args:
        layer: an ``nn.Linear`` with ``spectral_norm`` on ``weight`` (any other layer: ``layer(x)``).
        x: (B, in_features).

    Returns:
        (B, out_features), equal to ``layer(x)`` up to float rounding.
    """
    parametrizations = getattr(layer, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations or len(parametrizations.weight) != 1:
        return layer(x)
    norm = parametrizations.weight[0]
    weight = parametrizations.weight.original
    if not all(hasattr(norm, a) for a in ("_u", "_v", "_power_method")) or weight.dim() != 2:
        return layer(x)
    if norm.training:
        norm._power_method(weight, norm.n_power_iterations)  # under no_grad, as in the parametrization
    u = norm._u.clone(memory_format=torch.contiguous_format)
    v = norm._v.clone(memory_format=torch.contiguous_format)
    sigma = torch.vdot(u, torch.mv(weight, v))
    out = F.linear(x, weight) / sigma
    return out if layer.bias is None else out + layer.bias


@MAPPINGS.register("hypernetwork")
class HyperNetwork(nn.Module):
    """ATT3D's hypernetwork: a spectrally normalised 2-layer MLP that outputs the field's grid.

    ``out = s * W2 silu(W1 norm(x) + b1)`` with ``x`` the flattened token embeddings (B, L*D)
    (or the pooled (B, D)), both weights spectrally normalised (top singular value 1) and
    ``s = output_scale * sqrt(P / hidden_dim)``: since ``|W2 h| <= |h|``, this makes the RMS of the
    P outputs at most ``output_scale * rms(h)``, independent of P (at initialisation about
    ``output_scale * rms(h)``: a tall random matrix is close to an isometry).

    Args:
        text_len, text_dim: L and D of the token embeddings.
        out_shapes: ``{name: shape}`` per prompt, e.g. ``{"grid": (P_grid,)}``.
        hidden_dim: width of the hidden layer.
        use_tokens: read the flattened tokens (True, ATT3D) or the pooled embedding (False).
        layer_norm: LayerNorm (no affine) of the input vector.
        output_scale: see above; small values give small initial grids.
        n_power_iterations: power iterations per training step of the spectral norm.

    Shapes: ``forward(emb)`` with ``emb.tokens (B, text_len, text_dim)`` (or ``emb.pooled (B, text_dim)`` without
    ``use_tokens``) gives ``{name: (B, *shape)}`` for every entry of ``out_shapes``.
    """

    def __init__(self, text_len: int, text_dim: int, out_shapes: dict[str, tuple[int, ...]], hidden_dim: int = 64,
                 use_tokens: bool = True, layer_norm: bool = True, output_scale: float = 1.0,
                 n_power_iterations: int = 1):
        super().__init__()
        self.text_len, self.text_dim = int(text_len), int(text_dim)
        self.out_shapes = {k: tuple(int(d) for d in v) for k, v in out_shapes.items()}
        self.use_tokens = bool(use_tokens)
        self.out_dim = total_size(self.out_shapes)
        in_dim = self.text_len * self.text_dim if self.use_tokens else self.text_dim
        self.in_dim = in_dim
        self.norm = nn.LayerNorm(in_dim, elementwise_affine=False) if layer_norm else nn.Identity()
        self.fc1 = spectral_norm(nn.Linear(in_dim, hidden_dim), n_power_iterations=n_power_iterations)
        self.act = nn.SiLU()
        self.fc2 = spectral_norm(nn.Linear(hidden_dim, self.out_dim, bias=False), n_power_iterations=n_power_iterations)
        self.output_scale = float(output_scale)
        self.register_buffer("scale", torch.tensor(self.output_scale * math.sqrt(self.out_dim / hidden_dim)),
                             persistent=False)

    def hidden(self, emb: TextEmbedding) -> torch.Tensor:
        """(B, hidden_dim) hidden features of a batch of embeddings."""
        x = text_input(emb, self.use_tokens, self.text_len, self.text_dim)
        return self.act(spectral_linear(self.fc1, self.norm(x)))

    def forward(self, emb: TextEmbedding) -> dict[str, torch.Tensor]:
        """TextEmbedding (B prompts) -> ``{name: (B, *shape)}``."""
        flat = spectral_linear(self.fc2, self.hidden(emb)) * self.scale
        return split_outputs(flat, self.out_shapes)

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, output_scale={self.output_scale}"
