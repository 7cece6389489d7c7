"""The silhouettes that the renders show: optical depth along lines through a density grid.

A NeRF is trained through its volume renders only, so what it claims as its object is what those renders draw as
foreground: pixels whose ray gathers an opacity ``1 - exp(-tau)`` of at least
:data:`att3d.world.metrics.MASK_THRESHOLD` (0.5), i.e. an optical depth ``tau = int sigma ds`` of at least
:data:`OPACITY_DEPTH` (``ln 2``). Score distillation leaves a soft fringe of density outside that silhouette, so the
iso-surface of the density at the extraction threshold is a little fatter than the renders (and rounder at the
edges and apexes, where the fringe is thickest).

This module gives every sample of a density grid the **line depth**: the smallest, over a set of line directions,
of the optical depth of the whole straight line through the sample. Where it is at least ``ln 2``, an orthographic
render along each of those lines would draw the sample's pixel as foreground: the region is the *visual hull* of
the field's own silhouettes. Intersected with the density's solid (:func:`att3d.mesh.density.fill_interior`), it
trims the fringe that no render shows and keeps the inside solid (a hull has no inner cavities), so the exported
mesh covers what the renders show. Concavities that some line sees through (a torus's hole) stay open; the hull
cannot see into a concavity that no silhouette shows (no object of the shapes world has one).

Conventions: the grid is ``(R, R, R)`` indexed ``[x, y, z]``, samples ``spacing`` apart (the field's box
``[-bound, bound]^3``: ``spacing = 2 bound / (R - 1)``), density zero outside it. A line direction is a primitive
integer step ``d`` between samples (``d`` and ``-d`` are the same line), of length ``spacing * |d|``; the line
through a sample visits the samples ``x + n d``, and its optical depth is the trapezoid sum
``sum (sigma_a + sigma_b) / 2 * spacing * |d|`` over consecutive samples, plus half a step at each end (the density
is zero outside the grid). :data:`LINES_13` are the lines to the 26 neighbours (axes, face and body diagonals);
:data:`LINES_49` every primitive step with components in ``-2..2`` (the default: 49 silhouettes, about 15 degrees
apart).

That sum is the line's density times its step length ``spacing * |d|``, the same for every sample of the line:
:func:`line_index` numbers the lines of a direction, one pass over the grid adds each sample into its line's slot
of a small table, and each wanted sample reads its slot (the extraction wants only the samples at or next to its
solid, a few percent of the grid). On a CPU a kernel compiled by numba does this row by row (float32); elsewhere,
without numba, or with ``ATT3D_VISIBILITY=torch``, torch does it with ``index_add_`` and a gather (any device). The
two agree to rounding. :func:`directional_optical_depth` gives the depth from a ray's entry instead (the running
sum).
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import numpy as np
import torch

#: The optical depth at which a ray's accumulated opacity reaches 0.5 (the masks' foreground threshold).
OPACITY_DEPTH = math.log(2.0)
#: Density treated as empty space when cropping the grid to its object (a trained field's empty space is far
#: below it: about 1e-10 for the shipped model).
EMPTY_DENSITY = 1e-4
#: Environment switch: ``torch`` forces the torch sweep, ``auto`` (default) uses numba on a CPU when present.
ENV = "ATT3D_VISIBILITY"


def primitive_lines(max_step: int) -> tuple[tuple[int, int, int], ...]:
    """One step ``d`` per line direction: every primitive integer vector with components in
    ``-max_step..max_step``, of each pair ``d, -d`` the first in lexicographic order."""
    lines: list[tuple[int, int, int]] = []
    for d in itertools.product(range(-max_step, max_step + 1), repeat=3):
        if any(d) and math.gcd(*map(abs, d)) == 1 and tuple(-c for c in d) not in lines:
            lines.append(d)
    return tuple(lines)


#: The 13 lines to the 26 neighbouring samples (3 axes, 6 face diagonals, 4 body diagonals).
LINES_13 = primitive_lines(1)
#: The 49 lines of primitive steps with components in -2..2 (the default of :func:`line_optical_depth`).
LINES_49 = primitive_lines(2)


def _check(density: torch.Tensor, lines: tuple[tuple[int, int, int], ...]) -> None:
    if density.dim() != 3:
        raise ValueError(f"density must be (R, R, R), got shape {tuple(density.shape)}")
    if not lines:
        raise ValueError("need at least one line direction")
    for d in lines:
        if len(d) != 3 or not any(d) or math.gcd(*map(abs, d)) != 1 or 1 not in map(abs, d):
            raise ValueError(f"a line direction must be a primitive integer step with a component of +-1, got {d!r}")


def directional_optical_depth(density: torch.Tensor, direction: tuple[int, int, int], spacing: float
                              ) -> torch.Tensor:
    """Optical depth at every sample along the rays of one direction, from where they enter the grid (torch).

    ``tau(x) = tau(x - d) + (sigma(x - d) + sigma(x)) / 2 * spacing * |d|``, with ``tau = sigma = 0`` outside the
    grid (a sample whose ray enters at it has ``sigma(x) / 2 * spacing * |d|``: half a step inside).

    Args:
        density: (R, R, R) non-negative density, indexed ``[x, y, z]``.
        direction: the integer step ``d`` along which the rays travel (one component +-1).
        spacing: the distance between neighbouring samples along an axis (world units).

    Returns:
        (R, R, R) float32, the same layout.
    """
    _check(density, (direction,))
    flips = [axis for axis, c in enumerate(direction) if c < 0]
    sigma = density.float().clamp(min=0.0)
    if flips:  # travel towards +axis on every non-zero component
        sigma = sigma.flip(flips)
    step = [abs(c) for c in direction]
    lead = step.index(1)  # sweep along an axis the rays advance on one sample at a time
    order = [lead] + [a for a in range(3) if a != lead]
    sigma = sigma.permute(order)
    db, dc = step[order[1]], step[order[2]]
    half = 0.5 * float(spacing) * math.sqrt(sum(c * c for c in step))
    inc = sigma * half  # each sample's half-step share
    tau = torch.empty_like(sigma)
    tau[0] = inc[0]
    R1, R2 = sigma.shape[1], sigma.shape[2]
    for i in range(1, sigma.shape[0]):
        carried = tau[i - 1] + inc[i - 1]  # depth half a step past sample i-1
        row = inc[i].clone()
        if db < R1 and dc < R2:
            row[db:, dc:] += carried[:R1 - db, :R2 - dc]
        tau[i] = row
    tau = tau.permute([order.index(a) for a in range(3)])
    return tau.flip(flips) if flips else tau


def line_index(direction: tuple[int, int, int], shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], int, int]:
    """Number the lines of one direction through a grid: sample ``(i, j, k)`` lies on line
    ``base + i w0 + j w1 + k w2``, the same for every sample of a line and different between lines.

    With a lead axis ``a`` where ``|d_a| = 1`` (the first of axes 0 and 1 that has one, so that the contiguous axis 2
    moves along a row of the table, else axis 2) and ``c = d d_a``, the two other coordinates of ``p - p_a c`` do not
    change along a line; they index a table of ``R_b + |c_b| (R_a - 1)`` by ``R_c + |c_c| (R_a - 1)`` lines.

    Returns:
        ``(w0, w1, w2)``, ``base``, and the size of the table (the number of line numbers).
    """
    lead = next((a for a in (0, 1, 2) if abs(direction[a]) == 1), None)
    if lead is None:
        raise ValueError(f"a line direction needs a component of +-1, got {direction!r}")
    c = [v * direction[lead] for v in direction]
    b0, b1 = (ax for ax in range(3) if ax != lead)
    sizes, offsets = [], []
    for ax in (b0, b1):
        sizes.append(shape[ax] + abs(c[ax]) * (shape[lead] - 1))
        offsets.append(max(c[ax], 0) * (shape[lead] - 1))
    w = [0, 0, 0]
    w[b0], w[b1] = sizes[1], 1
    w[lead] = -(c[b0] * sizes[1] + c[b1])
    return (w[0], w[1], w[2]), offsets[0] * sizes[1] + offsets[1], sizes[0] * sizes[1]


@functools.lru_cache(maxsize=1)
def _kernel():
    """The compiled line-depth kernel, or None when numba is missing (compiled once, cached on disk)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; the torch sweep is the fallback
        return None

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def line_depth_min(sigma, weights, lengths, spans, out):  # pragma: no cover - compiled
        # Per direction: sum the density of every line into its slot of a small table (one pass over the grid,
        # row by row along the contiguous axis; a row of a line along that axis is one sum), then give each
        # wanted sample (row i, j: k in spans[i, j]) the sum of its line times the step's length, keeping the
        # smallest over the directions. The table of a direction fits the cache (at most 286^2 slots at 96^3).
        R0, R1, R2 = sigma.shape
        acc = np.zeros(int(weights[:, 4].max()), dtype=np.float32)
        for n in range(weights.shape[0]):
            w0, w1, w2, base, size = weights[n, 0], weights[n, 1], weights[n, 2], weights[n, 3], weights[n, 4]
            acc[:size] = 0.0
            for i in range(R0):
                for j in range(R1):
                    o = base + i * w0 + j * w1
                    row = sigma[i, j]
                    if w2 == 1:
                        for k in range(R2):
                            acc[o + k] += row[k]
                    elif w2 == 0:
                        t = np.float32(0.0)
                        for k in range(R2):
                            t += row[k]
                        acc[o] += t
                    else:
                        for k in range(R2):
                            acc[o + k * w2] += row[k]
            length = np.float32(lengths[n])
            for i in range(R0):
                for j in range(R1):
                    lo, hi = spans[i, j, 0], spans[i, j, 1]
                    if lo >= hi:
                        continue
                    o = base + i * w0 + j * w1
                    orow = out[i, j]
                    for k in range(lo, hi):
                        orow[k] = min(orow[k], acc[o + k * w2] * length)

    return line_depth_min


def _use_kernel(density: torch.Tensor) -> bool:
    return density.device.type == "cpu" and os.environ.get(ENV, "auto") != "torch" and _kernel() is not None


def line_optical_depth(density: torch.Tensor, spacing: float,
                       lines: tuple[tuple[int, int, int], ...] = LINES_49,
                       where: torch.Tensor | None = None) -> torch.Tensor:
    """The smallest optical depth, over ``lines``, of the whole line through each sample.

    Where it is at least :data:`OPACITY_DEPTH`, an orthographic render along every one of the lines draws the
    sample's pixel as foreground (the visual hull of those silhouettes). A line's depth is the trapezoid sum of the
    module docstring, which is the sum of the density along it times the step's length ``spacing |d|``: one pass
    per direction sums every line into a table, and each wanted sample reads its line's slot.

    Args:
        density: (R, R, R) non-negative density, indexed ``[x, y, z]``.
        spacing: the distance between neighbouring samples along an axis (world units).
        lines: one integer step per line direction (primitive, with a component of +-1; ``d`` and ``-d`` are the
            same line).
        where: (R, R, R) bool, the samples whose depth is wanted (None: all). The lines are summed in full either
            way; only the look-ups are saved (the extraction wants the samples at or next to its solid).

    Returns:
        (R, R, R) float32 on the density's device; 0 outside ``where`` and outside the bounding box of the samples
        denser than :data:`EMPTY_DENSITY` (those lines see nothing).
    """
    _check(density, lines)
    sigma = density.detach().float().clamp(min=0.0)
    full = torch.zeros_like(sigma)
    if where is not None and where.shape != sigma.shape:
        raise ValueError(f"where must be {tuple(sigma.shape)} like the density, got {tuple(where.shape)}")
    if float(sigma.max()) <= EMPTY_DENSITY or (where is not None and not bool(where.any())):
        return full
    # Work on the bounding box of the density above EMPTY_DENSITY alone: outside it a line gathers at most
    # EMPTY_DENSITY times its length (< 4e-4 in a box of bound 1), a twentieth of a percent of ln 2.
    box = []
    for axis in range(3):  # (a max over the other axes: torch's any over several dims is ten times slower)
        hit = (sigma.amax(dim=tuple(a for a in range(3) if a != axis)) > EMPTY_DENSITY).nonzero()
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(box)
    crop = sigma[box]
    wanted = None if where is None else where[box].to(sigma.device)
    shape = tuple(crop.shape)
    tables = [line_index(d, shape) for d in lines]
    lengths = [float(spacing) * math.sqrt(sum(c * c for c in d)) for d in lines]
    if _use_kernel(density):
        if wanted is None:
            spans = np.zeros(shape[:2] + (2,), dtype=np.int64)
            spans[..., 1] = shape[2]
        else:  # per row, the first wanted sample and one past the last (none: an empty span)
            w = wanted.numpy()
            anyk = w.any(axis=2)
            spans = np.stack([np.where(anyk, w.argmax(axis=2), 0),
                              np.where(anyk, shape[2] - w[..., ::-1].argmax(axis=2), 0)], axis=-1).astype(np.int64)
        weights = np.asarray([(*wt, base, size) for wt, base, size in tables], dtype=np.int64)
        out = np.full(shape, np.inf, dtype=np.float32)
        _kernel()(np.ascontiguousarray(crop.numpy()), weights, np.asarray(lengths, dtype=np.float64), spans, out)
        depth = torch.from_numpy(out)
    else:  # the same sums in torch, any device: scatter every sample into its line's slot, gather back
        i, j, k = (torch.arange(n, device=crop.device) for n in shape)
        flat = crop.reshape(-1)
        depth = torch.full_like(flat, math.inf)
        for ((w0, w1, w2), base, size), length in zip(tables, lengths):
            slot = (base + i[:, None, None] * w0 + j[None, :, None] * w1 + k[None, None, :] * w2).reshape(-1)
            sums = torch.zeros(size, dtype=flat.dtype, device=flat.device).index_add_(0, slot, flat)
            depth = torch.minimum(depth, sums[slot] * length)
        depth = depth.reshape(shape)
    if wanted is not None:
        depth = depth.masked_fill(~wanted, 0.0)
    full[box] = depth
    return full
