"""The neural field of att3d: multi-resolution grid features, a small shared MLP, a density bump.

One class serves both mapping variants:

- ``generated=True`` (ATT3D hypernetwork): every prompt has its own grid, whose values arrive
  flat in ``cond["grid"]`` (B, P_grid); ``conditioning_shapes() == {"grid": (P_grid,)}``.
- ``generated=False`` (concat baseline): one grid (an ``nn.Parameter``) is shared by all prompts
  and the prompt enters as a vector ``cond["text"]`` (B, C) concatenated to the MLP input;
  ``conditioning_shapes() == {"text": (C,)}``.

Density is ``act(raw + bump(x) + density_bias)`` with the Magic3D-style bump
``blob_density * exp(-|x|^2 / (2 blob_radius^2))`` so that a fresh field is a soft ball at the
centre and empty near the box corners; colour is ``sigmoid(raw_rgb)``. Points outside the box
``[-bound, bound]^3`` have zero density.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from att3d.field import encoding
from att3d.registry import FIELDS


class _TruncExp(torch.autograd.Function):
    """``exp`` whose backward clamps the input at 15 (torch-ngp's trunc_exp) to avoid overflowing gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """Exponential with a clamped gradient (elementwise)."""
    return _TruncExp.apply(x)


DENSITY_ACTIVATIONS = {
    "softplus": torch.nn.functional.softplus,
    "exp": trunc_exp,
}


@FIELDS.register("grid")
class GridField(nn.Module):
    """Multi-resolution grid field with per-prompt (generated) or shared grids.

    Args:
        generated: grids come per prompt from ``cond["grid"]`` (True) or are one shared parameter (False).
        num_levels, base_resolution, max_resolution: geometric series of level resolutions
            (vertices per axis), unless ``resolutions`` lists them explicitly.
        resolutions: explicit level resolutions (overrides the series).
        features_per_level: F, features per level.
        hashmap_size: a level with ``R^3 > hashmap_size`` vertices is hashed into a table of this many rows
            (pure-torch hashing is ~5x slower than a dense level on a CPU; the defaults are all dense).
        hidden_dim, num_hidden_layers: the shared MLP (SiLU).
        text_dim: C, width of ``cond["text"]`` when ``generated`` is False.
        include_position: also feed the (normalised) point to the MLP.
        level_gain: learnable per-level feature gains (initialised to ``feature_scale``).
        feature_scale: fixed multiplier of the grid features (initial gain).
        grid_init_std: std of the shared grid's initial values (``generated=False``).
        density_activation: ``softplus`` or ``exp`` (trunc_exp).
        density_bias: constant added before the activation (negative: empty space far from the bump).
        blob_density, blob_radius: the initial density bump at the centre.
        bound: scene box ``[-bound, bound]^3``.
        latent_dim: with ``generated``, also take a per-prompt code ``cond["latent"]`` (B, latent_dim) that is
            concatenated to the MLP input (equivalently: a generated bias of the MLP's first layer). It lets the
            mapping network set prompt-wide properties such as colour without writing them into every cell
            (0: no code). Ignored when ``generated`` is False.
        latent_mode: how the code enters (see :data:`LATENT_MODES`): ``input`` (concatenated to the MLP input, as
            above: it conditions density and colour) or ``colour`` (a per-prompt shift of the colour logits only,
            :func:`colour_shift_layer`: the density is the grid's alone).

    Shapes: ``conditioning_shapes()`` is ``{"grid": (P_grid,), "latent": (latent_dim,)}`` (generated; no
    ``latent`` with ``latent_dim=0``) or ``{"text": (text_dim,)}`` (shared); ``forward(points (B, N, 3), cond)``
    gives ``density (B, N) >= 0`` and ``rgb (B, N, 3)`` in [0, 1]; ``density(points, cond)`` is ``(B, N)``.
    """

    def __init__(self, generated: bool = True, num_levels: int = 3, base_resolution: int = 8,
                 max_resolution: int = 32, resolutions: Sequence[int] | None = None, features_per_level: int = 2,
                 hashmap_size: int = 2**15, hidden_dim: int = 16, num_hidden_layers: int = 2, text_dim: int = 32,
                 include_position: bool = True, level_gain: bool = True, feature_scale: float = 1.0,
                 grid_init_std: float = 0.01, density_activation: str = "softplus", density_bias: float = -4.0,
                 blob_density: float = 10.0, blob_radius: float = 0.4, bound: float = 1.0, latent_dim: int = 16,
                 latent_mode: str = "input"):
        super().__init__()
        check_latent_mode(latent_mode)
        if density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(
                f"density_activation must be one of {sorted(DENSITY_ACTIVATIONS)}, got {density_activation!r}")
        if resolutions is None:
            resolutions = encoding.level_resolutions(num_levels, base_resolution, max_resolution)
        self.resolutions = [int(r) for r in resolutions]
        self.features = int(features_per_level)
        self.layout = encoding.level_layout(self.resolutions, self.features, int(hashmap_size))
        self.grid_size = sum(n for _, _, n in self.layout)
        self.generated = bool(generated)
        self.text_dim = 0 if self.generated else int(text_dim)
        self.latent_dim = int(latent_dim) if self.generated else 0
        self.latent_mode = latent_mode
        self.include_position = bool(include_position)
        self.density_activation = density_activation
        self.density_bias = float(density_bias)
        self.blob_density = float(blob_density)
        self.blob_radius = float(blob_radius)
        self.bound = float(bound)
        self.feature_scale = float(feature_scale)

        n_levels = len(self.resolutions)
        if level_gain:
            self.level_gain = nn.Parameter(torch.full((n_levels,), self.feature_scale))
        else:
            self.register_buffer("level_gain", torch.full((n_levels,), self.feature_scale), persistent=False)
        if not self.generated:
            self.grid = nn.Parameter(torch.randn(1, self.grid_size) * grid_init_std)
        else:
            self.register_parameter("grid", None)

        latent_in = self.latent_dim if latent_mode == "input" else 0
        in_dim = n_levels * self.features + (3 if self.include_position else 0) + self.text_dim + latent_in
        self.mlp = decoder_mlp(in_dim, hidden_dim, num_hidden_layers)
        self.colour_shift = colour_shift_layer(self.latent_dim) if latent_mode == "colour" else None

    # -- contract ---------------------------------------------------------------------------

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """What the field needs per prompt: ``{"grid": (P_grid,)}`` or ``{"text": (C,)}``."""
        if self.generated:
            return {"grid": (self.grid_size,), **({"latent": (self.latent_dim,)} if self.latent_dim else {})}
        return {"text": (self.text_dim,)}

    def bump(self, points: torch.Tensor) -> torch.Tensor:
        """The initial density bump (pre-activation). (..., 3) -> (...)."""
        r2 = points.square().sum(-1)
        return self.blob_density * torch.exp(-r2 / (2.0 * self.blob_radius**2))

    def grids(self, cond: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-level grids: (B|1, F, R, R, R) dense volumes or (B|1, T, F) hash tables."""
        flat = cond["grid"] if self.generated else self.grid
        return encoding.split_levels(flat, self.layout, self.features)

    def features_at(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """MLP input. points: (B, N, 3) world -> (B, N, in_dim)."""
        B, N, _ = points.shape
        x = encoding.normalize_points(points, self.bound)
        feats = encoding.encode_levels(self.grids(cond), self.layout, x)  # (B, N, levels * F)
        gain = self.level_gain.repeat_interleave(self.features).to(feats.dtype)
        parts = [feats * gain]
        if self.include_position:
            parts.append(x)
        if self.latent_dim and self.colour_shift is None:
            parts.append(cond["latent"][:, None, :].to(feats.dtype).expand(B, N, self.latent_dim))
        if not self.generated:
            text = cond["text"]
            if text.shape != (B, self.text_dim):
                raise ValueError(f"cond['text'] must be ({B}, {self.text_dim}), got {tuple(text.shape)}")
            parts.append(text[:, None, :].expand(B, N, self.text_dim))
        return torch.cat(parts, dim=-1)

    def forward(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Density and colour.

        Args:
            points: (B, N, 3) world points.
            cond: per-prompt conditioning (see :meth:`conditioning_shapes`), batch B.

        Returns:
            density: (B, N) >= 0 (zero outside the box); rgb: (B, N, 3) in [0, 1].
        """
        raw = self.mlp(self.features_at(points, cond))  # (B, N, 4)
        if self.colour_shift is not None:
            raw = shift_colour(raw, self.colour_shift, cond["latent"])
        return decode_raw(raw, points, self.bump(points), self.density_bias, self.density_activation, self.bound)

    def density(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, 3) -> (B, N) density."""
        return self.forward(points, cond)[0]

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{k}{r}" for k, r, _ in self.layout)
        return (f"generated={self.generated}, levels=[{kinds}], features={self.features}, grid_size={self.grid_size}, "
                f"text_dim={self.text_dim}, bound={self.bound}")


#: How a field's per-prompt code enters its decoder: ``input`` (an MLP input: density and colour) or ``colour``
#: (a per-prompt shift of the colour logits only). With the ground truth as teacher, the code as an input is a
#: shortcut for the triplane field: a DeepSDF-like blob from the code and the position fills the torus's hole and
#: rounds the shapes; with no code at all the colour is not carried; ``colour`` keeps the shapes and the colours.
LATENT_MODES = ("input", "colour")


def check_latent_mode(latent_mode: str) -> None:
    """Raise ValueError unless ``latent_mode`` is one of :data:`LATENT_MODES`."""
    if latent_mode not in LATENT_MODES:
        raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}")


def colour_shift_layer(latent_dim: int) -> nn.Linear | None:
    """``Linear(latent_dim -> 3)``, the per-prompt colour-logit shift of ``latent_mode="colour"``, at a tenth of
    its default scale with a zero bias (a fresh field stays grey); None when ``latent_dim`` is 0."""
    if not latent_dim:
        return None
    layer = nn.Linear(int(latent_dim), 3)
    with torch.no_grad():
        layer.weight.mul_(0.1)
        layer.bias.zero_()
    return layer


def shift_colour(raw: torch.Tensor, layer: nn.Linear, latent: torch.Tensor) -> torch.Tensor:
    """Add ``layer(latent)`` to the colour logits. raw: (B, N, 4); latent: (B|1, latent_dim) -> (B, N, 4)."""
    shift = layer(latent.to(raw.dtype))[:, None, :]  # (B|1, 1, 3)
    return torch.cat([raw[..., :1], raw[..., 1:] + shift], dim=-1)


def decoder_mlp(in_dim: int, hidden_dim: int, num_hidden_layers: int) -> nn.Sequential:
    """The fields' shared decoder: ``num_hidden_layers`` x (Linear, SiLU), then Linear(-> 4) (raw density, rgb).

    The head starts at a tenth of its default scale with a zero bias, so that the raw density starts near 0 and
    the field's centre bump alone shapes the initial density.
    """
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(d, hidden_dim), nn.SiLU()]
        d = hidden_dim
    head = nn.Linear(d, 4)
    with torch.no_grad():
        head.weight.mul_(0.1)
        head.bias.zero_()
    layers.append(head)
    return nn.Sequential(*layers)


def decode_raw(raw: torch.Tensor, points: torch.Tensor, bump: torch.Tensor, density_bias: float,
               density_activation: str, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's raw output -> density and colour, the conventions every field shares.

    Args:
        raw: (B, N, 4) pre-activations; points: (B, N, 3); bump: (B, N) (or broadcastable) initial density bump.

    Returns:
        density: (B, N) ``activation(raw_0 + bump + density_bias)``, zero outside the box ``[-bound, bound]^3``;
        rgb: (B, N, 3) ``sigmoid(raw_1:4)``.
    """
    density = DENSITY_ACTIVATIONS[density_activation](raw[..., 0] + bump + density_bias)
    density = density * encoding.inside_box(points, bound).to(density.dtype)
    return density, torch.sigmoid(raw[..., 1:])


__all__ = ["DENSITY_ACTIVATIONS", "LATENT_MODES", "GridField", "check_latent_mode", "colour_shift_layer",
           "shift_colour", "decode_raw", "decoder_mlp", "trunc_exp"]
