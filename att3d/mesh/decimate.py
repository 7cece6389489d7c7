"""Face budgets: quadric-error decimation that keeps a closed mesh closed.

The decimation itself is Garland-Heckbert quadric edge collapse from the maintained
``fast-simplification`` package (MIT; a wrapper of Fast-Quadric-Mesh-Simplification). Measured on the
shipped model's 64 marching-cubes meshes (2-core CPU, one thread; ``docs/results/decimation.md``) it is
about 15x faster than pymeshlab's quadric collapse (GPL-3, so not a dependency of this MIT library) at
the same two-sided surface distance. Its collapses do not check the link condition, so a few
collapses pinch two sheets of the surface together: an edge then has 4 faces (non-manifold), and a
pair of folded faces can repeat one triangle. :func:`make_manifold` repairs both:

* a triangle that repeats another (the same three vertices) is removed with its twin: a folded pair
  encloses no volume, so every edge keeps an even face count;
* around a non-manifold edge the faces are paired by angle (each face with its angular neighbour of
  opposite orientation), and the vertices are split per fan of faces that are connected through
  paired edges. The sheets then touch at coincident vertices but are separate in the topology:
  every edge has exactly two faces again, and the geometry is unchanged.

fast-simplification keeps the mesh being simplified in process-global C++ state between its load, simplify and
read-back calls, so two threads decimating at once would read each other's faces (a mesh of the right vertices
joined by another mesh's triangles). :func:`decimate` holds a process-wide lock around that sequence; the rest of
the export (extraction, atlas, bake) still overlaps across threads.

All functions take and return tensors (faces ``(F, 3)`` long, vertices ``(V, 3)`` float) on the input's
device; the work runs on the CPU in numpy.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from att3d.utils.errors import Att3dError

__all__ = ["DecimationError", "decimate", "edge_face_counts", "is_closed", "make_manifold"]


class DecimationError(Att3dError):
    """A face budget cannot be applied (bad budget, decimation library missing)."""


def _np(a: torch.Tensor | np.ndarray) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _undirected_edges(faces: np.ndarray) -> np.ndarray:
    """(3F, 2) sorted vertex pairs of every face corner's edge, in the order (e01, e12, e20) per face."""
    e = np.stack([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], axis=1).reshape(-1, 2)
    return np.sort(e, axis=1)


def _edge_keys(edges: np.ndarray) -> np.ndarray:
    """(E,) int64 key ``i * n + j`` of sorted vertex pairs (one 1-D sort instead of a row-wise unique)."""
    n = int(edges.max()) + 1 if edges.size else 1
    return edges[:, 0].astype(np.int64) * n + edges[:, 1]


def edge_face_counts(faces: torch.Tensor | np.ndarray) -> np.ndarray:
    """Number of faces on each distinct undirected edge.

    Args:
        faces: (F, 3) vertex indices.

    Returns:
        (E,) int counts; a closed 2-manifold has every count equal to 2.
    """
    f = _np(faces).astype(np.int64)
    if f.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    _, counts = np.unique(_edge_keys(_undirected_edges(f)), return_counts=True)
    return counts


def is_closed(faces: torch.Tensor | np.ndarray) -> bool:
    """Whether every edge has exactly two faces (a closed 2-manifold surface; False for no faces)."""
    counts = edge_face_counts(faces)
    return bool(counts.size) and bool((counts == 2).all())


def _drop_repeated_faces(faces: np.ndarray) -> np.ndarray:
    """Remove index-degenerate faces and every face whose vertex set repeats another's (with its twins)."""
    f = faces[(faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])]
    if f.shape[0] == 0:
        return f
    t = np.sort(f, axis=1)
    n = int(t.max()) + 1
    _, inverse, counts = np.unique((t[:, 0] * n + t[:, 1]) * n + t[:, 2], return_inverse=True, return_counts=True)
    return f[counts[inverse.reshape(-1)] == 1]


def _pair_half_edges(verts: np.ndarray, faces: np.ndarray, alternative: frozenset = frozenset()
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Twin half-edges: arrays (h, g) of half-edge ids (``3 f + corner``) paired across their shared edge.

    A half-edge ``3 f + k`` runs from ``faces[f, k]`` to ``faces[f, (k + 1) % 3]``. Around an edge with two
    faces the pair is unique; around a non-manifold edge the faces are sorted by the angle of their third
    vertex about the edge and each is paired with an angular neighbour of opposite direction; for the edges
    ``(i, j)`` (``i < j``) in ``alternative`` the other such pairing is taken (the ring shifted by one).
    """
    F = faces.shape[0]
    src = faces.reshape(-1)
    dst = faces[:, [1, 2, 0]].reshape(-1)
    key = np.sort(np.stack([src, dst], axis=1), axis=1)
    order = np.argsort(_edge_keys(key), kind="stable")
    sk = _edge_keys(key)[order]
    start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    sizes = np.diff(np.r_[start, 3 * F])
    twins_a: list[np.ndarray] = []
    twins_b: list[np.ndarray] = []
    two = start[sizes == 2]
    a, b = order[two], order[two + 1]
    ok = src[a] != src[b]  # opposite directions (consistently oriented)
    twins_a.append(a[ok])
    twins_b.append(b[ok])
    opposite = faces[:, [2, 0, 1]].reshape(-1)  # the corner opposite each half-edge
    for s, n in zip(start[sizes > 2], sizes[sizes > 2]):
        hs = order[s:s + n]
        p, q = verts[key[hs[0], 0]], verts[key[hs[0], 1]]
        axis = (q - p) / max(np.linalg.norm(q - p), 1e-12)
        ref = np.eye(3)[np.argmin(np.abs(axis))]
        u = np.cross(axis, ref)
        u /= max(np.linalg.norm(u), 1e-12)
        w = np.cross(axis, u)
        r = verts[opposite[hs]] - p
        angle = np.arctan2(r @ w, r @ u)
        ring = list(hs[np.argsort(angle)])
        forward = [src[h] == key[h, 0] for h in ring]
        # pair neighbours around the ring: rotations whose consecutive pairs all run in opposite directions
        m = len(ring) // 2 * 2  # an odd face out stays unpaired (its edge becomes a boundary)
        valid = [o for o in range(len(ring))
                 if all(forward[(o + i) % n] != forward[(o + i + 1) % n] for i in range(0, m, 2))]
        if valid:
            o = valid[min(len(valid) - 1, 1)] if (int(key[hs[0], 0]), int(key[hs[0], 1])) in alternative else valid[0]
            rotated = ring[o:] + ring[:o]
            twins_a.append(np.array(rotated[0:m:2], dtype=np.int64))
            twins_b.append(np.array(rotated[1:m:2], dtype=np.int64))
    return np.concatenate(twins_a).astype(np.int64), np.concatenate(twins_b).astype(np.int64)


def make_manifold(verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair pinched sheets: drop repeated triangles, split vertices along non-manifold edges.

    Args:
        verts: (V, 3) positions; faces: (F, 3) long, consistently oriented.

    Returns:
        ``(verts (V', 3), faces (F', 3))``: a copy of a vertex for each fan of faces around it that is
        connected through manifold edges (``V' >= V`` minus unreferenced ones), unchanged positions;
        ``F' <= F``. A closed input (even face count on every edge) gives a closed output.
    """
    device, dtype = verts.device, verts.dtype
    v = _np(verts).astype(np.float64)
    f = _drop_repeated_faces(_np(faces).astype(np.int64))
    if f.shape[0] == 0:
        return verts.new_zeros((0, 3)), faces.new_zeros((0, 3))
    if f.shape[0] == faces.shape[0] and _nonmanifold_edges(f).shape[0] == 0:
        return verts, faces  # already a 2-manifold (every edge has two faces): nothing to split
    alternative: frozenset = frozenset()
    for _ in range(8):  # a fan that passes a pinched edge twice needs the edge's other pairing
        origin, new_faces = _split_fans(v, f, alternative)
        bad = _nonmanifold_edges(new_faces)
        if bad.shape[0] == 0:
            break
        alternative = alternative ^ frozenset(map(tuple, np.sort(origin[bad], axis=1).tolist()))
    return (torch.as_tensor(v[origin], dtype=dtype, device=device),
            torch.as_tensor(new_faces, dtype=torch.long, device=device))


def _split_fans(v: np.ndarray, f: np.ndarray, alternative: frozenset) -> tuple[np.ndarray, np.ndarray]:
    """One vertex per fan of corners linked through paired half-edges.

    Returns:
        ``origin`` (V',): the input vertex of each new vertex; ``faces`` (F, 3) in the new numbering.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as components

    h, g = _pair_half_edges(v, f, alternative)
    # Half-edge h = 3 fi + k runs corner k -> corner k+1 of face fi; its twin g runs the other way, so
    # corner k of h's face is the same vertex as corner k+1 of g's face, and vice versa.
    fh, kh = h // 3, h % 3
    fg, kg = g // 3, g % 3
    a = np.concatenate([3 * fh + kh, 3 * fh + (kh + 1) % 3])
    b = np.concatenate([3 * fg + (kg + 1) % 3, 3 * fg + kg])
    n = 3 * f.shape[0]
    graph = coo_matrix((np.ones(a.shape[0], dtype=np.int8), (a, b)), shape=(n, n))
    _, label = components(graph, directed=False)
    corner_vertex = f.reshape(-1)
    # one new vertex per (component of corners); components never mix vertices (links join equal vertices)
    first = np.full(label.max() + 1, -1, dtype=np.int64)
    first[label[::-1]] = corner_vertex[::-1]
    new_faces = label.reshape(-1, 3)
    # renumber in order of first use, so an already-manifold mesh keeps a stable vertex order
    _, first_use = np.unique(new_faces.reshape(-1), return_index=True)
    order = np.argsort(first_use)
    used = np.unique(new_faces.reshape(-1))[order]
    remap = np.empty(label.max() + 1, dtype=np.int64)
    remap[used] = np.arange(used.shape[0])
    return first[used], remap[new_faces]


def _nonmanifold_edges(faces: np.ndarray) -> np.ndarray:
    """(K, 2) sorted vertex pairs of the edges that do not have exactly two faces."""
    edges = _undirected_edges(faces)
    keys = _edge_keys(edges)
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return edges[first[counts != 2]]


#: Serialises fast-simplification, whose load -> simplify -> read-back sequence works on process-global state.
_SIMPLIFY_LOCK = threading.Lock()


def decimate(verts: torch.Tensor, faces: torch.Tensor, max_faces: int, aggressiveness: float = 7.0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadric edge collapse to at most ``max_faces`` faces, then :func:`make_manifold`.

    Args:
        verts: (V, 3) float positions; faces: (F, 3) long.
        max_faces: the face budget (> 0); a mesh within it is returned unchanged.
        aggressiveness: fast-simplification's ``agg`` (higher: faster, slightly lower quality).

    Returns:
        ``(verts (V', 3), faces (F', 3))`` with ``F' <= max_faces``, on the input's device and dtype; closed
        (:func:`is_closed`) when the input is (retried with lower aggressiveness in the rare case it is not).
    """
    if not isinstance(max_faces, int) or isinstance(max_faces, bool) or max_faces < 1:
        raise DecimationError(f"the face budget must be a positive integer, got {max_faces!r}")
    if faces.shape[0] <= max_faces:
        return verts, faces
    try:
        import fast_simplification
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DecimationError("a face budget needs the fast-simplification package: "
                              "pip install fast-simplification") from e
    v = _np(verts).astype(np.float32)
    f = _np(faces).astype(np.int32)
    closed = is_closed(f)
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    # A closed input must stay closed: in the rare case the repair cannot separate a pinch (or a singular quadric
    # places a vertex at infinity), collapse again less aggressively (a different sequence of collapses).
    for agg in (float(aggressiveness), max(1.0, aggressiveness - 2.0), max(1.0, aggressiveness - 4.0)):
        with _SIMPLIFY_LOCK:  # process-global state in the C++ library: one mesh at a time
            v2, f2 = fast_simplification.simplify(v, f, target_count=int(max_faces), agg=agg)
            v2, f2 = np.array(v2, copy=True), np.array(f2, copy=True)
        if not np.isfinite(v2).all():
            continue
        best = make_manifold(torch.as_tensor(v2, dtype=verts.dtype, device=verts.device),
                             torch.as_tensor(f2.astype(np.int64), device=faces.device))
        if not closed or is_closed(best[1]):
            break
    if best is None:
        raise DecimationError(f"the decimation of a {faces.shape[0]}-face mesh gave non-finite vertices; "
                              "use a larger face budget (--faces) or none (--faces 0)")
    return best
