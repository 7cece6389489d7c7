"""Lambertian shading under one directional light (used by the world's renderer and the mesh rasterizer).

The defaults are the shapes world's fixed light (``shared/WORLD.md``): ``albedo * (0.35 + 0.65 max(0, n.l))``
with ``l`` the unit vector of (0.5, 0.8, 0.6), towards the light. :mod:`att3d.world.shapes` takes its
``LIGHT_DIR``, ``AMBIENT`` and ``DIFFUSE`` from here, so the two cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Direction towards the light (unit).
LIGHT_DIR: tuple[float, float, float] = tuple(v / math.sqrt(0.5**2 + 0.8**2 + 0.6**2) for v in (0.5, 0.8, 0.6))
AMBIENT = 0.35
DIFFUSE = 0.65


def lambert(albedo: torch.Tensor, normals: torch.Tensor, light_dir: Sequence[float] = LIGHT_DIR,
            ambient: float = AMBIENT, diffuse: float = DIFFUSE) -> torch.Tensor:
    """Shading ``albedo * (ambient + diffuse * max(0, n.l))``.

    Args:
        albedo: (..., 3); normals: (..., 3) outward unit normals.
        light_dir: (3,) unit direction towards the light.
        ambient, diffuse: the constant and the cosine term.

    Returns:
        (..., 3) shaded colours.
    """
    light = torch.tensor(light_dir, dtype=normals.dtype, device=normals.device)
    return albedo * (ambient + diffuse * (normals * light).sum(-1, keepdim=True).clamp(min=0.0))


__all__ = ["AMBIENT", "DIFFUSE", "LIGHT_DIR", "lambert"]
