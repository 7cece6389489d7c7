"""The objects of the shapes world (``shared/WORLD.md``): 8 SDFs, 8 colours, 64 captions.

Every SDF is negative inside. Sphere, box, capped cylinder, capped cone, torus and
capsule are exact; pyramid and octahedron use the maximum of their face-plane
distances, which is exact inside and a conservative bound outside (never larger
than the true distance), so sphere tracing stays safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# The fixed light of WORLD.md: the defaults of att3d.render.shading.lambert (kept here under the world's names).
from att3d.render.shading import AMBIENT, DIFFUSE, LIGHT_DIR  # noqa: F401
from att3d.utils.errors import Att3dError

SHAPE_NAMES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule", "octahedron")
COLOUR_NAMES: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "gray")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.90, 0.80, 0.10),
    "green": (0.10, 0.65, 0.20),
    "blue": (0.10, 0.25, 0.85),
    "purple": (0.55, 0.15, 0.70),
    "pink": (0.95, 0.45, 0.70),
    "gray": (0.45, 0.45, 0.45),
}
BACKGROUND = (1.0, 1.0, 1.0)
#: Every object lies inside this ball. WORLD.md says 0.75, but its own pyramid (base side 0.9 at
#: y = -0.45) reaches sqrt(3) * 0.45 = 0.779 at the base corners, so tracing uses 0.8.
BOUND_RADIUS = 0.8


def _length(v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(v, dim=-1)


def sdf_sphere(p: torch.Tensor) -> torch.Tensor:
    return _length(p) - 0.5


def sdf_cube(p: torch.Tensor, half: float = 0.4) -> torch.Tensor:
    q = p.abs() - half
    return _length(q.clamp(min=0.0)) + q.max(dim=-1).values.clamp(max=0.0)


def sdf_cylinder(p: torch.Tensor, radius: float = 0.4, half_height: float = 0.45) -> torch.Tensor:
    d = torch.stack([_length(p[..., [0, 2]]) - radius, p[..., 1].abs() - half_height], dim=-1)
    return d.max(dim=-1).values.clamp(max=0.0) + _length(d.clamp(min=0.0))


def sdf_cone(p: torch.Tensor, half_height: float = 0.45, r_base: float = 0.5, r_top: float = 0.0) -> torch.Tensor:
    """Exact capped cone along y: base radius ``r_base`` at -h, top radius ``r_top`` at +h."""
    qx = _length(p[..., [0, 2]])
    qy = p[..., 1]
    h = half_height
    k1x, k1y = r_top, h
    k2x, k2y = r_top - r_base, 2.0 * h
    ca_x = qx - torch.minimum(qx, torch.where(qy < 0.0, torch.full_like(qx, r_base), torch.full_like(qx, r_top)))
    ca_y = qy.abs() - h
    t = (((k1x - qx) * k2x + (k1y - qy) * k2y) / (k2x * k2x + k2y * k2y)).clamp(0.0, 1.0)
    cb_x = qx - k1x + k2x * t
    cb_y = qy - k1y + k2y * t
    inside = (cb_x < 0.0) & (ca_y < 0.0)
    s = torch.where(inside, -torch.ones_like(qx), torch.ones_like(qx))
    return s * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def sdf_torus(p: torch.Tensor, major: float = 0.35, minor: float = 0.15) -> torch.Tensor:
    q = torch.stack([_length(p[..., [0, 2]]) - major, p[..., 1]], dim=-1)
    return _length(q) - minor


def sdf_pyramid(p: torch.Tensor, half_base: float = 0.45, y_base: float = -0.45, y_apex: float = 0.45) -> torch.Tensor:
    """Square pyramid as the max of its 5 face-plane distances (conservative outside)."""
    height = y_apex - y_base
    norm = math.sqrt(height * height + half_base * half_base)
    ax, az = p[..., 0].abs(), p[..., 2].abs()
    dy = p[..., 1] - y_apex
    side_x = (height * ax + half_base * dy) / norm
    side_z = (height * az + half_base * dy) / norm
    base = y_base - p[..., 1]
    return torch.maximum(torch.maximum(side_x, side_z), base)


def sdf_capsule(p: torch.Tensor, radius: float = 0.3, half_segment: float = 0.3) -> torch.Tensor:
    y = p[..., 1].clamp(-half_segment, half_segment)
    q = p - torch.stack([torch.zeros_like(y), y, torch.zeros_like(y)], dim=-1)
    return _length(q) - radius


def sdf_octahedron(p: torch.Tensor, size: float = 0.6) -> torch.Tensor:
    """|x|+|y|+|z| <= size, as the max of its 8 face-plane distances (conservative outside)."""
    return (p.abs().sum(dim=-1) - size) / math.sqrt(3.0)


SDFS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sphere": sdf_sphere,
    "cube": sdf_cube,
    "cylinder": sdf_cylinder,
    "cone": sdf_cone,
    "torus": sdf_torus,
    "pyramid": sdf_pyramid,
    "capsule": sdf_capsule,
    "octahedron": sdf_octahedron,
}


@dataclass(frozen=True)
class WorldObject:
    """One object of the world: a shape in a colour, with its caption."""

    shape: str
    colour: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape)

    @property
    def shape_index(self) -> int:
        return SHAPE_NAMES.index(self.shape)

    @property
    def colour_index(self) -> int:
        return COLOUR_NAMES.index(self.colour)

    @property
    def albedo(self) -> tuple[float, float, float]:
        return COLOURS[self.colour]

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 3) -> (...) signed distance."""
        return SDFS[self.shape](points)


class CaptionError(Att3dError, ValueError):
    """A prompt that is not a shapes-world caption where one is required (e.g. for scoring)."""


def caption(colour: str, shape: str) -> str:
    """The caption of an object: exactly ``a {colour} {shape}``."""
    return f"a {colour} {shape}"


def all_objects() -> list[WorldObject]:
    """The 64 objects in a fixed order: shape-major (shape i, colour j) at index 8 i + j."""
    return [WorldObject(s, c) for s in SHAPE_NAMES for c in COLOUR_NAMES]


def all_captions() -> list[str]:
    """The 64 captions of ``shapes64`` in the order of :func:`all_objects`."""
    return [o.caption for o in all_objects()]


def heldout_objects() -> list[WorldObject]:
    """The 8 held-out pairs (shape i, colour i)."""
    return [WorldObject(SHAPE_NAMES[i], COLOUR_NAMES[i]) for i in range(8)]


def heldout_captions() -> list[str]:
    return [o.caption for o in heldout_objects()]


def train_captions() -> list[str]:
    """The 56 training captions (all but the held-out diagonal), in :func:`all_objects` order."""
    held = set(heldout_captions())
    return [c for c in all_captions() if c not in held]


def parse_caption(text: str) -> WorldObject:
    """The object named by a caption ``a {colour} {shape}`` (case and spaces normalised)."""
    words = text.strip().lower().split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SDFS:
        raise CaptionError(f"not a shapes-world caption: {text!r} (expected 'a <colour> <shape>')")
    return WorldObject(words[2], words[1])
