"""A triplane field (LATTE3D): three axis-aligned feature planes per prompt, a small shared MLP, a density bump.

LATTE3D (Xie et al., "LATTE3D: Large-scale Amortized Text-To-Enhanced3D Synthesis", ECCV 2024, Sec. 3.1)
replaces ATT3D's hypernetwork-generated grid by a triplane that a text-conditioned convolutional network
generates (:class:`att3d.mapping.triplane.TriplaneGenerator`); a small MLP shared by all prompts decodes the
sampled plane features into density and colour. The planes are the per-prompt conditioning:
``cond["planes"]`` (B, 3, C, R, R), plus an optional per-prompt code ``cond["latent"]`` (B, latent_dim).

Conventions (shared by every function here):

- Points are normalised to ``[-1, 1]^3`` (``points / bound``). Plane ``p`` spans the axes ``PLANE_AXES[p]``:
  0 = xy, 1 = xz, 2 = yz. A plane is stored as ``(C, R, R)`` indexed ``[c, i_a, i_b]`` where ``a, b`` are its
  two axes in that order (first axis first, like the grid field's ``[f, ix, iy, iz]`` volumes).
- Vertex ``i`` of a plane sits at ``-1 + 2 i / (R - 1)`` (``align_corners=True``): the corner vertices lie on
  the box faces, as in :mod:`att3d.field.encoding`; outside the box the features are clamped to the border
  (the density is zero there anyway).
- Sampling is bilinear (:func:`torch.nn.functional.grid_sample`); the three planes' features are combined by
  ``concat`` (B, N, 3C; the default), ``sum`` (B, N, C; EG3D-style aggregation), ``product`` (B, N, C; the
  Hadamard product of K-planes, Fridovich-Keil et al. 2023) or ``concat_product`` (B, N, 4C: the three planes and
  their product). A sum or concatenation can only add the planes' evidence, so a small decoder MLP makes
  intersections of extrusions (a cube) easily but not shapes whose cross-section depends on the height (a cone,
  a pyramid, a torus's tube); the product gives it the interaction of the three planes directly.

Output conventions are the grid field's (:class:`att3d.field.grid_field.GridField`): density
``act(raw + bump(x) + density_bias)`` with the same Magic3D-style centre bump and ``softplus`` (or ``exp``)
activation, so a fresh field is a soft ball at the centre and empty near the corners; colour
``sigmoid(raw_rgb)``; zero density outside the box ``[-bound, bound]^3``. The MLP's last layer starts at a tenth
of its default initialisation with a zero bias, so the bump alone shapes the initial density.

Cost: the MLP is as small as the grid field's (2 hidden layers of 16) and its first layer is applied part by part
(plane features, position, and the latent once per prompt instead of once per point), so evaluating the default
field (3 x 8 x 32^2 planes) costs about what the default 3-level grid field does on a CPU. On the regular lattice
that mesh extraction samples, :meth:`TriplaneField.lattice` reads per-plane tables of the first layer's shares
instead of sampling the planes per point (:class:`TriplaneLattice`): 3-4x less per point than :meth:`density`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from att3d.field import encoding
from att3d.field.grid_field import (
    DENSITY_ACTIVATIONS,
    check_latent_mode,
    colour_shift_layer,
    decode_raw,
    decoder_mlp,
    shift_colour,
)
from att3d.registry import FIELDS

#: The two world axes (0 = x, 1 = y, 2 = z) spanned by each plane, in storage order ``[c, i_a, i_b]``.
PLANE_AXES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2))
#: Each way of combining the three planes' features, and the MLP input it gives, in multiples of C.
COMBINE_WIDTHS: dict[str, int] = {"concat": 3, "sum": 1, "product": 1, "concat_product": 4}
COMBINE_MODES = tuple(COMBINE_WIDTHS)


def plane_coords(points: torch.Tensor) -> torch.Tensor:
    """Each point's 2-D coordinates on the three planes.

    Args:
        points: (B, N, 3) in ``[-1, 1]^3``.

    Returns:
        (B, 3, N, 2): ``[..., p, :, :] = (points[..., a], points[..., b])`` for ``(a, b) = PLANE_AXES[p]``.
    """
    B, N, _ = points.shape
    index = torch.tensor([i for ab in PLANE_AXES for i in ab], device=points.device)
    return points.index_select(-1, index).reshape(B, N, 3, 2).transpose(1, 2)


def triplane_sample(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation of per-prompt triplanes (one ``grid_sample`` call for all planes).

    Args:
        planes: (B, 3, C, R, R) or (1, 3, C, R, R) (one triplane shared by all B point sets); plane ``p``
            spans ``PLANE_AXES[p]`` and is indexed ``[c, i_a, i_b]``.
        points: (B, N, 3) in ``[-1, 1]^3`` (outside: clamped to the border).

    Returns:
        (B, N, 3, C): the features of each plane at each point (a view of ``grid_sample``'s output: flattening
        the last two dimensions, as ``combine_planes(..., "concat")`` does, copies nothing).
    """
    B, N, _ = points.shape
    if planes.dim() != 5 or planes.shape[1] != 3:
        raise ValueError(f"planes must be (B, 3, C, R, R), got {tuple(planes.shape)}")
    if planes.shape[0] == 1 and B != 1:
        return triplane_sample(planes, points.reshape(1, B * N, 3)).reshape(B, N, 3, -1)
    if planes.shape[0] != B:
        raise ValueError(f"planes batch {planes.shape[0]} does not match points batch {B}")
    _, _, C, H, W = planes.shape
    # grid_sample reads the last coordinate as the index along W (the plane's second axis b) and the first
    # along H (its first axis a): pass (b, a).
    index = torch.tensor([i for ab in PLANE_AXES for i in reversed(ab)], device=points.device)
    coords = points.to(planes.dtype).index_select(-1, index).reshape(B, N, 3, 2).transpose(1, 2)
    out = F.grid_sample(planes.reshape(B * 3, C, H, W), coords.reshape(B * 3, N, 1, 2), mode="bilinear",
                        padding_mode="border", align_corners=True)  # (B * 3, C, N, 1)
    return out.reshape(B, 3, C, N).permute(0, 3, 1, 2)


def plane_lattice(planes: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """Each plane sampled (bilinearly) at every pair of values of one axis lattice.

    The points ``(axis[i], axis[j], axis[k])`` of a regular lattice meet plane ``p`` at only ``L^2`` places, so
    their features are gathers from this table (:class:`TriplaneLattice`) instead of ``3 L^3`` bilinear samples.

    Args:
        planes: (B, 3, C, R, R) (see :func:`triplane_sample`).
        axis: (L,) coordinates in ``[-1, 1]`` shared by the three axes.

    Returns:
        (B, 3, L, L, C): ``out[b, p, u, v] = triplane_sample(planes, point)[b, 0, p]`` for any point whose
        coordinates along ``PLANE_AXES[p] = (a, b)`` are ``(axis[u], axis[v])`` (the same values bit for bit).
    """
    B, _, C, R, _ = planes.shape
    L = axis.shape[0]
    a = axis.to(planes.dtype)
    # grid_sample reads the last coordinate along W (the plane's second axis) and the first along H
    grid = torch.stack([a[None, :].expand(L, L), a[:, None].expand(L, L)], dim=-1)  # [u, v] = (axis[v], axis[u])
    grid = grid[None].expand(B * 3, L, L, 2)
    out = F.grid_sample(planes.reshape(B * 3, C, R, R), grid, mode="bilinear", padding_mode="border",
                        align_corners=True)  # (B * 3, C, L, L)
    return out.reshape(B, 3, C, L, L).permute(0, 1, 3, 4, 2)


def triplane_sample_reference(planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The same as :func:`triplane_sample` by explicit corner gathering (the test's cross-check).

    Args:
        planes: (B, 3, C, R, R); points: (B, N, 3) in ``[-1, 1]^3``.

    Returns:
        (B, N, 3, C).
    """
    B, N, _ = points.shape
    R = planes.shape[-1]
    pos = ((points.clamp(-1.0, 1.0) + 1.0) * 0.5 * (R - 1))  # (B, N, 3) in vertex units
    corner = pos.floor().long().clamp(0, R - 2)
    frac = pos - corner.to(pos.dtype)
    out = []
    bidx = torch.arange(B)[:, None].expand(B, N)
    for p, (a, b) in enumerate(PLANE_AXES):
        plane = planes[:, p]  # (B, C, R, R)
        ia, ib, fa, fb = corner[..., a], corner[..., b], frac[..., a, None], frac[..., b, None]
        v00 = plane[bidx, :, ia, ib]  # (B, N, C)
        v01 = plane[bidx, :, ia, ib + 1]
        v10 = plane[bidx, :, ia + 1, ib]
        v11 = plane[bidx, :, ia + 1, ib + 1]
        out.append((1 - fa) * (1 - fb) * v00 + (1 - fa) * fb * v01 + fa * (1 - fb) * v10 + fa * fb * v11)
    return torch.stack(out, dim=2)


def combine_planes(feats: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, N, 3, C) per-plane features -> (B, N, 3C) (``concat``), (B, N, C) (``sum``, ``product``) or
    (B, N, 4C) (``concat_product``: the three planes' features, then their product)."""
    if mode == "concat":
        return feats.flatten(-2)
    if mode == "sum":
        return feats.sum(dim=-2)
    if mode == "product":
        return feats.prod(dim=-2)
    if mode == "concat_product":
        return torch.cat([feats.flatten(-2), feats.prod(dim=-2)], dim=-1)
    raise ValueError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")


def density_bump(points: torch.Tensor, blob_density: float, blob_radius: float) -> torch.Tensor:
    """Magic3D's initial density bump ``blob_density * exp(-|x|^2 / (2 blob_radius^2))``. (..., 3) -> (...)."""
    return blob_density * torch.exp(-points.square().sum(-1) / (2.0 * blob_radius**2))


@FIELDS.register("triplane")
class TriplaneField(nn.Module):
    """Triplane field: per-prompt feature planes ``cond["planes"]``, decoded by a shared MLP (LATTE3D).

    Args:
        channels: C, features per plane.
        resolution: R, vertices per plane axis.
        combine: ``concat`` (MLP input 3C), ``sum`` (C), ``product`` (C) or ``concat_product`` (4C) of the three
            planes' features (see the module's conventions).
        hidden_dim, num_hidden_layers: the shared MLP (SiLU).
        include_position: also feed the (normalised) point to the MLP.
        feature_scale: fixed multiplier of the sampled plane features.
        latent_dim: also take a per-prompt code ``cond["latent"]`` (B, latent_dim) (0: none).
        latent_mode: how the code enters, as for the grid field (:data:`att3d.field.grid_field.LATENT_MODES`):
            ``input`` (an MLP input: density and colour) or ``colour`` (a per-prompt shift of the colour logits
            only: the density is the planes' alone).
        density_activation: ``softplus`` or ``exp`` (trunc_exp).
        density_bias: constant added before the activation (negative: empty space far from the bump).
        blob_density, blob_radius: the initial density bump at the centre.
        bound: scene box ``[-bound, bound]^3``.

    Shapes: ``conditioning_shapes()`` is ``{"planes": (3, C, R, R), "latent": (latent_dim,)}`` (no ``latent``
    with ``latent_dim=0``); ``forward(points (B, N, 3), cond)`` gives ``density (B, N) >= 0`` and
    ``rgb (B, N, 3)`` in [0, 1]; ``density(points, cond)`` is ``(B, N)``. A batch of 1 in ``cond`` is shared by
    all B point sets.
    """

    def __init__(self, channels: int = 8, resolution: int = 32, combine: str = "concat", hidden_dim: int = 16,
                 num_hidden_layers: int = 2, include_position: bool = True, feature_scale: float = 1.0,
                 latent_dim: int = 16, latent_mode: str = "input", density_activation: str = "softplus",
                 density_bias: float = -4.0, blob_density: float = 10.0, blob_radius: float = 0.4,
                 bound: float = 1.0):
        super().__init__()
        if density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(
                f"density_activation must be one of {sorted(DENSITY_ACTIVATIONS)}, got {density_activation!r}")
        check_latent_mode(latent_mode)
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if channels < 1 or resolution < 2:
            raise ValueError(f"need channels >= 1 and resolution >= 2, got {channels}, {resolution}")
        self.channels = int(channels)
        self.resolution = int(resolution)
        self.combine = combine
        self.include_position = bool(include_position)
        self.feature_scale = float(feature_scale)
        self.latent_dim = int(latent_dim)
        self.latent_mode = latent_mode
        self.density_activation = density_activation
        self.density_bias = float(density_bias)
        self.blob_density = float(blob_density)
        self.blob_radius = float(blob_radius)
        self.bound = float(bound)

        feat_dim = self.channels * COMBINE_WIDTHS[combine]
        latent_in = self.latent_dim if latent_mode == "input" else 0
        in_dim = feat_dim + (3 if self.include_position else 0) + latent_in
        self.mlp = decoder_mlp(in_dim, hidden_dim, num_hidden_layers)
        self.colour_shift = colour_shift_layer(self.latent_dim) if latent_mode == "colour" else None

    # -- contract ---------------------------------------------------------------------------

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """What the field needs per prompt: ``{"planes": (3, C, R, R), "latent": (latent_dim,)}``."""
        planes = (3, self.channels, self.resolution, self.resolution)
        return {"planes": planes, **({"latent": (self.latent_dim,)} if self.latent_dim else {})}

    def bump(self, points: torch.Tensor) -> torch.Tensor:
        """The initial density bump (pre-activation). (..., 3) -> (...)."""
        return density_bump(points, self.blob_density, self.blob_radius)

    def features_at(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """MLP input ``[plane features, x, latent]`` (no latent with ``latent_mode="colour"``).
        points: (B, N, 3) world -> (B, N, in_dim).

        (:meth:`forward` applies the MLP's first layer to the three parts separately, the latent once per
        prompt, which gives the same ``mlp(features_at(points, cond))`` without building this tensor.)
        """
        B, N, _ = points.shape
        feats, x, latent = self._parts(points, cond)
        parts = [feats, x] if x is not None else [feats]
        if latent is not None and self.colour_shift is None:
            parts.append(latent[:, None, :].expand(B, N, self.latent_dim))
        return torch.cat(parts, dim=-1)

    def checked_planes(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``cond["planes"]`` (B, 3, C, R, R), or a ValueError naming the shape this field needs."""
        planes = cond["planes"]
        expected = (3, self.channels, self.resolution, self.resolution)
        if tuple(planes.shape[1:]) != expected:
            raise ValueError(f"cond['planes'] must be (B, {', '.join(map(str, expected))}), got {tuple(planes.shape)}")
        return planes

    def _parts(self, points: torch.Tensor, cond: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(plane features (B, N, 3C | C), normalised points (B, N, 3) or None, latent (B|1, latent_dim) or None)."""
        planes = self.checked_planes(cond)
        x = encoding.normalize_points(points, self.bound)
        feats = combine_planes(triplane_sample(planes, x), self.combine)
        if self.feature_scale != 1.0:
            feats = feats * self.feature_scale
        latent = cond["latent"].to(feats.dtype) if self.latent_dim else None
        return feats, (x.to(feats.dtype) if self.include_position else None), latent

    def raw(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The MLP's output before the activations: (B, N, 3) points -> (B, N, 4) (density, r, g, b).

        Equal to ``mlp(features_at(points, cond))`` (plus the code's colour shift with ``latent_mode="colour"``);
        the first layer is applied part by part (the latent's share once per prompt), about a third faster on a
        CPU.
        """
        feats, x, latent = self._parts(points, cond)
        first = self.mlp[0]
        nf = feats.shape[-1]
        h = F.linear(feats, first.weight[:, :nf])
        if x is not None:
            h = h + F.linear(x, first.weight[:, nf:nf + 3])
            nf += 3
        bias = first.bias
        if latent is not None and self.colour_shift is None:
            bias = F.linear(latent, first.weight[:, nf:], bias)[:, None, :]  # (B|1, 1, hidden)
        raw = self.mlp[1:](h + bias)
        if latent is not None and self.colour_shift is not None:
            raw = shift_colour(raw, self.colour_shift, latent)
        return raw

    def forward(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Density and colour.

        Args:
            points: (B, N, 3) world points.
            cond: per-prompt conditioning (see :meth:`conditioning_shapes`), batch B (or 1).

        Returns:
            density: (B, N) >= 0 (zero outside the box); rgb: (B, N, 3) in [0, 1].
        """
        raw = self.raw(points, cond)  # (B, N, 4)
        return decode_raw(raw, points, self.bump(points), self.density_bias, self.density_activation, self.bound)

    def density(self, points: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N, 3) -> (B, N) density."""
        return self.forward(points, cond)[0]

    def lattice(self, axis: torch.Tensor, cond: dict[str, torch.Tensor]) -> TriplaneLattice:
        """The field on the lattice of points ``(axis[i], axis[j], axis[k])`` (:class:`TriplaneLattice`): what
        mesh extraction samples (:mod:`att3d.mesh.density`), at a fraction of :meth:`density`'s cost.

        Args:
            axis: (L,) world coordinates shared by the three axes.
            cond: the conditioning of :meth:`forward`, batch B.
        """
        return TriplaneLattice(self, axis, cond)

    def extra_repr(self) -> str:
        return (f"planes=3x{self.channels}x{self.resolution}^2, combine={self.combine}, latent_dim={self.latent_dim} "
                f"({self.latent_mode}), bound={self.bound}")


class TriplaneLattice:
    """A triplane field's density on a regular lattice, from per-plane tables (exact; no ``grid_sample`` per point).

    At the lattice point ``(axis[i], axis[j], axis[k])`` plane xy is read at ``(i, j)``, xz at ``(i, k)`` and yz at
    ``(j, k)``: :func:`plane_lattice` samples each plane once at the ``L^2`` pairs. With ``combine`` ``concat`` or
    ``sum`` the decoder's first layer is linear in each plane's features, so the tables hold each plane's share of
    the first hidden layer (B, L, L, hidden), and the position's and the code's shares are per axis value and per
    prompt: a point costs three row gathers and the rest of the MLP. Other combines gather the features and apply
    the first layer as :meth:`TriplaneField.raw` does. The result equals ``field.density`` at those points up to the
    float rounding of the first layer's sum (about 1e-6 relative); it carries gradients like the field.

    Args:
        field: the :class:`TriplaneField`.
        axis: (L,) world coordinates shared by the three axes.
        cond: the field's conditioning, batch B.
    """

    def __init__(self, field: TriplaneField, axis: torch.Tensor, cond: dict[str, torch.Tensor]):
        planes = field.checked_planes(cond)
        if axis.dim() != 1 or axis.shape[0] < 1:
            raise ValueError(f"axis must be (L,) with L >= 1, got {tuple(axis.shape)}")
        self.field = field
        self.axis = axis
        self.L = int(axis.shape[0])
        x = encoding.normalize_points(axis, field.bound)
        table = plane_lattice(planes, x)  # (B, 3, L, L, C)
        if field.feature_scale != 1.0:
            table = table * field.feature_scale
        first = field.mlp[0]
        C = field.channels
        self.projected = field.combine in ("concat", "sum")
        B = planes.shape[0]
        if self.projected:
            weights = [first.weight[:, p * C:(p + 1) * C] if field.combine == "concat" else first.weight[:, :C]
                       for p in range(3)]
            # (B, L * L, hidden) per plane: its share of the first layer
            self.tables = [F.linear(table[:, p], weights[p]).reshape(B, self.L * self.L, -1) for p in range(3)]
        else:
            self.tables = [table[:, p].reshape(B, self.L * self.L, C) for p in range(3)]
        nf = C * COMBINE_WIDTHS[field.combine]
        position = None
        if field.include_position:  # (L, hidden) per axis: x[i] * W[:, nf + axis]
            wpos = first.weight[:, nf:nf + 3]
            position = [x.to(wpos.dtype)[:, None] * wpos[:, c] for c in range(3)]
            nf += 3
        bias = first.bias
        latent = cond["latent"].to(table.dtype) if field.latent_dim else None
        if latent is not None and field.colour_shift is None:
            bias = F.linear(latent, first.weight[:, nf:], bias)  # (B|1, hidden)
        bias = bias if bias.dim() == 2 else bias[None]
        if self.projected:  # fold the position's and the code's shares into the tables: xy += x W_x + y W_y, ...
            L = self.L
            if position is not None:
                self.tables[0] = self.tables[0] + (position[0][:, None] + position[1][None, :]).reshape(1, L * L, -1)
                self.tables[1] = self.tables[1] + position[2][None, :].expand(L, L, -1).reshape(1, L * L, -1)
            self.tables[2] = self.tables[2] + bias[:, None, :]
            position = None
        self.position = position
        self.bias = bias  # (B|1, hidden)

    def density(self, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The density at the lattice points ``(axis[i], axis[j], axis[k])``.

        Args:
            i, j, k: (N,) long indices into ``axis``, shared by the B prompts.

        Returns:
            (B, N) density, as :meth:`TriplaneField.density` at those points.
        """
        field, L = self.field, self.L
        ij, ik, jk = i * L + j, i * L + k, j * L + k
        parts = [t.index_select(1, idx) for t, idx in zip(self.tables, (ij, ik, jk))]  # 3 x (B|1, N, D)
        if self.projected:  # position and bias are in the tables
            h = parts[0] + parts[1] + parts[2]
        else:
            feats = combine_planes(torch.stack(parts, dim=2), field.combine)
            nf = feats.shape[-1]
            h = F.linear(feats, field.mlp[0].weight[:, :nf])
            if self.position is not None:
                h += self.position[0].index_select(0, i) + self.position[1].index_select(0, j)
                h += self.position[2].index_select(0, k)
            h += self.bias[:, None, :]
        raw = field.mlp[1:](h)  # (B, N, 4); the code's colour shift does not touch the density
        points = torch.stack([self.axis[i], self.axis[j], self.axis[k]], dim=-1)[None]  # (1, N, 3)
        density, _ = decode_raw(raw[..., :1], points, field.bump(points), field.density_bias,
                                field.density_activation, field.bound)
        return density


__all__ = ["COMBINE_MODES", "COMBINE_WIDTHS", "PLANE_AXES", "TriplaneField", "TriplaneLattice", "combine_planes",
           "density_bump", "plane_coords", "plane_lattice", "triplane_sample", "triplane_sample_reference"]
