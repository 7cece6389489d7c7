"""Feature planes as a conditioning tensor: the contract a mapping that writes planes and the triplane field that
reads them share (one place, since neither layer imports the other)."""

from __future__ import annotations

#: The supported numbers of planes: the three axis-aligned ones (xy, xz, yz), or those and the two diagonal ones
#: (uy, vy; :class:`att3d.field.triplane.TriplaneField`).
NUM_PLANES: tuple[int, ...] = (3, 5)


def check_num_planes(num_planes: int) -> int:
    """``num_planes`` if supported (3: xy, xz, yz; 5: and the diagonal uy, vy), else a ValueError."""
    if num_planes not in NUM_PLANES:
        raise ValueError(f"a triplane has 3 planes (or 5 with the diagonal planes), got {num_planes}")
    return int(num_planes)


def is_plane_shape(shape: tuple[int, ...]) -> bool:
    """Whether a per-prompt output shape is a set of square feature planes ``(P, C, R, R)`` with a supported P."""
    return len(shape) == 4 and shape[0] in NUM_PLANES and shape[2] == shape[3] and shape[2] >= 1


__all__ = ["NUM_PLANES", "check_num_planes", "is_plane_shape"]
