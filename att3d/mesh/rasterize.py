"""A differentiable triangle rasterizer in pure torch (CPU and GPU), split like nvdiffrast.

* :func:`rasterize` / :func:`rasterize_screen`: visibility. For every pixel centre
  ``(col + 0.5, row + 0.5)`` the nearest covering triangle (z-buffer), its perspective-correct
  barycentrics and its view depth. Coverage is decided per triangle over the pixel centres of
  its bounding box (candidate lists built with ``repeat_interleave``, edge functions in
  float64, z-buffer by ``scatter_reduce(amin)``), in chunks of bounded memory.
* :func:`interpolate`: vertex attributes at the pixels.
* :func:`texture_sample`: bilinear texture lookup (``grid_sample``).
* :func:`antialias`: analytic antialiasing of occlusion edges (nvdiffrast's ``antialias``), which gives the
  image a gradient w.r.t. where the silhouettes are.
* :func:`render_mesh`: these together with the project's cameras.

Gradients: visibility (which triangle covers a pixel) is discrete and carries none; the
barycentrics are recomputed differentiably for the winning triangles, so :func:`interpolate`
is differentiable w.r.t. the attributes *and* the vertex positions (through the barycentrics,
interior of triangles only), and :func:`texture_sample` w.r.t. the texture and the uvs. The
silhouettes (a surface against the background, or against a farther surface) move only through
:func:`antialias`, which blends the two pixels of every pair that an occlusion edge separates by where the
edge crosses the line between their centres, a differentiable function of the edge's screen position.

Conventions: pixel coordinates are ``x = column``, ``y = row`` (row 0 at the top), pixel
centres at +0.5, exactly as :meth:`att3d.render.cameras.OrbitCameras.project`. Both windings
are rasterized unless ``cull_backfaces``; a triangle wound counter-clockwise seen from the
camera is front facing. Triangles with a vertex closer than ``near`` to the camera plane are
dropped (no clipping). UVs follow trimesh/OBJ: ``(0, 0)`` is the bottom-left of the texture
image, ``v`` points up (image row 0 is ``v = 1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from att3d.render.cameras import OrbitCameras
from att3d.render.shading import lambert as shade


@dataclass
class RasterOutput:
    """Per-pixel visibility.

    Attributes:
        face_id: (B, H, W) long index of the visible face, -1 on the background.
        bary: (B, H, W, 3) perspective-correct barycentrics of the pixel centre in that face
            (zeros on the background); differentiable w.r.t. the vertex positions.
        depth: (B, H, W) view depth (distance along the camera axis) of the surface, 0 on the background.
    """

    face_id: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """(B, H, W) bool foreground."""
        return self.face_id >= 0


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _edge_bary(tri: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Screen-space barycentrics of points in triangles.

    Args:
        tri: (N, 3, 2) triangle corners (x, y); px, py: (N,) points.

    Returns:
        (N, 3) barycentrics (sum 1; +-inf/nan for degenerate triangles).
    """
    x0, y0 = tri[:, 0, 0], tri[:, 0, 1]
    x1, y1 = tri[:, 1, 0], tri[:, 1, 1]
    x2, y2 = tri[:, 2, 0], tri[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) / area
    w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) / area
    w2 = 1.0 - w0 - w1
    return torch.stack([w0, w1, w2], dim=-1)


@torch.no_grad()
def _visible_faces_torch(xy: torch.Tensor, depth: torch.Tensor, faces: torch.Tensor, H: int, W: int, near: float,
                         cull_backfaces: bool, max_candidates: int) -> torch.Tensor:
    """The visibility pass in torch (any device): the nearest face per pixel centre, (B, H, W) long (-1: none).

    Every (triangle, pixel of its bounding box) candidate is tested with edge functions, in chunks of at most
    ``max_candidates``; a depth buffer by ``scatter_reduce`` keeps the nearest, ties to the larger face index.
    """
    B, device = xy.shape[0], xy.device
    tri = xy.detach()[:, faces].double()  # (B, F, 3, 2)
    tz = depth.detach()[:, faces].double()  # (B, F, 3)
    x, y = tri[..., 0], tri[..., 1]
    area = (x[..., 1] - x[..., 0]) * (y[..., 2] - y[..., 0]) - (x[..., 2] - x[..., 0]) * (y[..., 1] - y[..., 0])
    valid = (tz > near).all(-1) & (area != 0) & torch.isfinite(area)
    if cull_backfaces:
        valid &= area < 0  # rows grow downwards: counter-clockwise on screen has negative area
    c_lo = torch.ceil(x.min(-1).values - 0.5).clamp(min=0)
    c_hi = torch.floor(x.max(-1).values - 0.5).clamp(max=W - 1)
    r_lo = torch.ceil(y.min(-1).values - 0.5).clamp(min=0)
    r_hi = torch.floor(y.max(-1).values - 0.5).clamp(max=H - 1)
    valid &= (c_hi >= c_lo) & (r_hi >= r_lo)
    bi, fi = valid.nonzero(as_tuple=True)  # candidate triangles
    c_lo, r_lo = c_lo[bi, fi].long(), r_lo[bi, fi].long()
    wbox = c_hi[bi, fi].long() - c_lo + 1
    count = wbox * (r_hi[bi, fi].long() - r_lo + 1)
    tri_c, tz_c = tri[bi, fi], tz[bi, fi]  # (N, 3, 2), (N, 3)

    pids, zs, fids = [], [], []
    ends = torch.cumsum(count, 0)
    starts = ends - count
    n_tri = bi.shape[0]
    first = 0
    while first < n_tri:
        # Largest chunk [first, last) whose candidates fit, at least one triangle.
        limit = int(starts[first]) + max_candidates
        last = max(int(torch.searchsorted(ends, torch.tensor(limit, device=device), right=True)), first + 1)
        sl = slice(first, last)
        cnt = count[sl]
        rep = torch.repeat_interleave(torch.arange(last - first, device=device), cnt)
        off = torch.arange(rep.shape[0], device=device) - (starts[sl] - starts[first])[rep]
        wb = wbox[sl][rep]
        col = c_lo[sl][rep] + off % wb
        row = r_lo[sl][rep] + torch.div(off, wb, rounding_mode="floor")
        bary = _edge_bary(tri_c[sl][rep], col.double() + 0.5, row.double() + 0.5)
        inside = (bary >= 0).all(-1)
        rep, col, row, bary = rep[inside], col[inside], row[inside], bary[inside]
        z = 1.0 / (bary / tz_c[sl][rep]).sum(-1)
        g = rep + first
        pids.append((bi[g] * H + row) * W + col)
        zs.append(z)
        fids.append(fi[g])
        first = last

    face_id = torch.full((B * H * W,), -1, dtype=torch.long, device=device)
    if pids:
        pid, z, fid = torch.cat(pids), torch.cat(zs), torch.cat(fids)
        zbuf = torch.full((B * H * W,), float("inf"), dtype=z.dtype, device=device)
        zbuf.scatter_reduce_(0, pid, z, "amin")
        win = z == zbuf[pid]
        face_id.scatter_reduce_(0, pid[win], fid[win], "amax")
    return face_id.reshape(B, H, W)


def rasterize_screen(xy: torch.Tensor, depth: torch.Tensor | None, faces: torch.Tensor,
                     resolution: int | tuple[int, int], cull_backfaces: bool = False, near: float = 1e-4,
                     max_candidates: int = 1 << 20) -> RasterOutput:
    """Rasterize triangles given in pixel coordinates (the 2D core).

    Args:
        xy: (B, V, 2) or (V, 2) pixel coordinates (x = column, y = row; centres at +0.5).
        depth: (B, V) or (V,) positive view depths (perspective-correct interpolation, nearest
            wins), or None for a flat 2D rasterization (all depths 1: affine barycentrics, ties
            broken by the larger face index).
        faces: (F, 3) long.
        resolution: H = W, or (H, W).
        cull_backfaces: drop triangles that appear clockwise on screen.
        near: triangles with a vertex at depth <= near are dropped.
        max_candidates: bound on the (triangle, pixel) candidate pairs processed at once.

    Returns:
        :class:`RasterOutput` with (B, H, W) maps.
    """
    H, W = _size(resolution)
    if xy.dim() == 2:
        xy = xy[None]
    B = xy.shape[0]
    if depth is None:
        depth = torch.ones(xy.shape[:2], dtype=xy.dtype, device=xy.device)
    elif depth.dim() == 1:
        depth = depth[None].expand(B, -1)
    device = xy.device

    from att3d.mesh import raster_cpu

    compiled = None
    if raster_cpu.available(device):  # the same visibility pass, compiled (numba)
        compiled = raster_cpu.visible_face_ids(xy, depth, faces, H, W, near=near, cull_backfaces=cull_backfaces,
                                               out_dtype=xy.dtype)
        face_id = compiled[0]
        if not (torch.is_grad_enabled() and (xy.requires_grad or depth.requires_grad)):
            # nothing to differentiate: the kernel's barycentrics and depth (the torch pass's within 1e-6)
            return RasterOutput(face_id=face_id, bary=compiled[1], depth=compiled[2])
    else:
        face_id = _visible_faces_torch(xy, depth, faces, H, W, near, cull_backfaces, max_candidates)
    # Differentiable barycentrics and depth of the winners.
    bary = torch.zeros(B, H, W, 3, dtype=xy.dtype, device=device)
    depth_map = torch.zeros(B, H, W, dtype=xy.dtype, device=device)
    pb, prow, pcol = (face_id >= 0).nonzero(as_tuple=True)
    if pb.shape[0]:
        f = faces[face_id[pb, prow, pcol]]  # (P, 3)
        tri_p = xy[pb[:, None], f]  # (P, 3, 2)
        z_p = depth[pb[:, None], f]  # (P, 3)
        w = _edge_bary(tri_p, pcol.to(xy.dtype) + 0.5, prow.to(xy.dtype) + 0.5)
        w_over_z = w / z_p
        inv_z = w_over_z.sum(-1, keepdim=True)
        bary = bary.index_put((pb, prow, pcol), w_over_z / inv_z)
        depth_map = depth_map.index_put((pb, prow, pcol), 1.0 / inv_z.squeeze(-1))
    return RasterOutput(face_id=face_id, bary=bary, depth=depth_map)


def project_vertices(verts: torch.Tensor, cameras: OrbitCameras, resolution: int | tuple[int, int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """World vertices seen by B cameras: pixel coordinates (B, V, 2) and view depths (B, V).

    Args:
        verts: (V, 3) shared by all cameras or (B, V, 3) one mesh per camera; resolution: H = W (the cameras are
            square).
    """
    H, W = _size(resolution)
    if H != W:
        raise ValueError("OrbitCameras render square images")
    if verts.dim() == 2:
        verts = verts[None].expand(len(cameras), -1, -1)
    return cameras.project(verts, H)


def rasterize(verts: torch.Tensor, faces: torch.Tensor, resolution: int | tuple[int, int],
              cameras: OrbitCameras | None = None, cull_backfaces: bool = False,
              near: float = 1e-4) -> RasterOutput:
    """Rasterize a mesh seen by cameras, or given in clip space.

    Args:
        verts: with ``cameras``: (V, 3) world positions shared by all cameras or (B, V, 3) one
            mesh per camera; without: (B, V, 4) OpenGL-style clip coordinates ``(x, y, z, w)``
            with ``w`` the positive view depth (NDC ``x/w, y/w`` in [-1, 1], +y up; ``z`` unused).
        faces: (F, 3) long.
        resolution: H = W, or (H, W) (clip space only; the cameras are square).
        cameras: B cameras (:class:`~att3d.render.cameras.OrbitCameras`) or None.
        cull_backfaces: drop faces wound clockwise as seen from the camera.
        near: faces with a vertex at view depth <= near are dropped.

    Returns:
        :class:`RasterOutput` with (B, H, W) maps.
    """
    H, W = _size(resolution)
    if cameras is not None:
        xy, depth = project_vertices(verts, cameras, resolution)
    else:
        if verts.dim() != 3 or verts.shape[-1] != 4:
            raise ValueError(f"without cameras verts must be clip coordinates (B, V, 4), got {tuple(verts.shape)}")
        depth = verts[..., 3]
        ndc = verts[..., :2] / depth[..., None]
        xy = torch.stack([(ndc[..., 0] + 1.0) * 0.5 * W, (1.0 - ndc[..., 1]) * 0.5 * H], dim=-1)
    return rasterize_screen(xy, depth, faces, (H, W), cull_backfaces=cull_backfaces, near=near)


def interpolate(attr: torch.Tensor, rast: RasterOutput, faces: torch.Tensor) -> torch.Tensor:
    """Interpolate vertex attributes at the pixels with the rasterizer's barycentrics.

    Args:
        attr: (V, C) shared or (B, V, C) per image.
        rast: the output of :func:`rasterize`.
        faces: (F, 3) long, the faces that were rasterized.

    Returns:
        (B, H, W, C), zero on the background; differentiable w.r.t. ``attr`` and, through
        ``rast.bary``, the vertex positions.
    """
    from att3d.mesh import raster_cpu

    B, H, W = rast.face_id.shape
    if (raster_cpu.available(attr.device) and attr.dtype in (torch.float32, torch.float64)
            and not (torch.is_grad_enabled() and (attr.requires_grad or rast.bary.requires_grad))):
        return raster_cpu.interpolate(attr, rast.face_id, rast.bary, faces)
    idx = (rast.face_id >= 0).nonzero(as_tuple=True)  # only the covered pixels: the background stays zero
    tri = faces[rast.face_id[idx]]  # (P, 3)
    vals = attr[tri] if attr.dim() == 2 else attr[idx[0][:, None], tri]  # (P, 3, C)
    out_p = (rast.bary[idx][..., None] * vals).sum(-2)
    return out_p.new_zeros(B, H, W, attr.shape[-1]).index_put(idx, out_p)


def face_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """The face across each edge of each face.

    Args:
        faces: (F, 3) long; edge ``k`` of a face runs from its corner ``k`` to corner ``k + 1``.

    Returns:
        (F, 3) long: the other face that has edge ``k`` of face ``f``, or -1 where the edge is on a boundary (one
        face) or non-manifold (three or more).
    """
    F = faces.shape[0]
    out = torch.full((F, 3), -1, dtype=torch.long, device=faces.device)
    if F == 0:
        return out
    a, b = faces, faces.roll(-1, dims=1)
    n = int(faces.max()) + 1
    keys = (torch.minimum(a, b) * n + torch.maximum(a, b)).reshape(-1)  # (3F,) slot 3 f + k
    order = torch.argsort(keys)
    sk = keys[order]
    same = sk[1:] == sk[:-1]  # sorted slots i, i + 1 share an edge
    alone_before = torch.ones_like(same)
    alone_before[1:] = ~same[:-1]
    alone_after = torch.ones_like(same)
    alone_after[:-1] = ~same[1:]
    pair = same & alone_before & alone_after  # exactly two slots on this edge
    i = pair.nonzero().squeeze(1)
    s0, s1 = order[i], order[i + 1]
    flat = out.reshape(-1)
    flat[s0] = torch.div(s1, 3, rounding_mode="floor")
    flat[s1] = torch.div(s0, 3, rounding_mode="floor")
    return flat.reshape(F, 3)


def _segment_exit(tri: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t_min: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the line from ``a`` to ``b`` leaves a triangle that it is in (Cyrus-Beck), and through which edge.

    Args:
        tri: (N, 3, 2) screen triangles (either winding); a, b: (N, 2) points.
        t_min: (N,) where the line entered the triangle (crossings before it are not exits); None: 0.

    Returns:
        t: (N,) the exit point ``a + t (b - a)``: the smallest crossing from ``t_min`` on, along the line, of the
        edges whose inside the line leaves (``inf`` where it leaves none); differentiable w.r.t. ``tri``.
        edge: (N,) long, the edge ``k`` (corner ``k`` to ``k + 1``) crossed there.
    """
    p0 = tri
    d = tri.roll(-1, dims=1) - p0  # edge k from corner k to corner k + 1: (N, 3, 2)
    e1, e2 = d[:, 0], -d[:, 2]
    orient = torch.where(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0] >= 0, 1.0, -1.0).to(tri.dtype)[:, None]

    def inside(q: torch.Tensor) -> torch.Tensor:  # (N, 3): >= 0 on the inner side of every edge
        r = q[:, None, :] - p0
        return orient * (d[..., 0] * r[..., 1] - d[..., 1] * r[..., 0])

    ga, gb = inside(a), inside(b)
    leaves = gb < ga  # the line goes towards the outer side of this edge
    t = torch.where(leaves, ga / torch.where(leaves, ga - gb, torch.ones_like(ga)), torch.full_like(ga, float("inf")))
    if t_min is not None:  # an edge whose line was left before the entry point is behind: not the exit
        t = torch.where(t < t_min[:, None].to(t.dtype) - 1e-6, torch.full_like(t, float("inf")), t)
    t_exit, edge = t.min(dim=-1)
    return t_exit, edge


#: Triangles that :func:`antialias` walks through from a pixel's face towards the silhouette edge.
MAX_WALK = 64


def antialias(colour: torch.Tensor, face_id: torch.Tensor, xy: torch.Tensor, depth: torch.Tensor,
              faces: torch.Tensor, depth_gap: float = 0.05, neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """Analytic antialiasing of occlusion edges (nvdiffrast's ``antialias``): silhouette gradients.

    For every pair of horizontally or vertically adjacent pixels ``(o, n)`` separated by an occlusion edge (``o``
    covered by a face ``f``, ``n`` by the background or by a surface more than ``depth_gap`` farther), the point
    ``t`` in [0, 1] where the segment from ``o``'s centre to ``n``'s crosses the *silhouette* is found: starting in
    ``f``, the segment is followed across the faces it passes through (:func:`face_neighbours`) until it leaves
    one through a silhouette edge, an edge whose other face is turned away from the camera, or that has none (at
    most :data:`MAX_WALK` faces). A pair is left alone when the walk reaches ``n``'s centre on the surface (a steep
    stretch of one surface that the depth gap took for an occlusion) or finds no silhouette. The pixel that the edge
    leaves short of the midpoint takes a share of the other's colour: ``n += (t - 1/2) (c_o - c_n)`` when the
    surface reaches past the midpoint (``t > 1/2``), else ``o += (1/2 - t) (c_n - c_o)``: along a line of pixels,
    each pixel's colour is then the share of it that the surface covers. The image changes little (only edge
    pixels, by at most half the step), but its derivative w.r.t. the corners of the silhouette edge is the colour
    step times the edge's motion across the pixel line, so a loss on the image moves silhouettes. Pixels on a
    shared edge of a continuous surface (no depth gap) are left alone.

    Taking the edge of ``f`` itself instead, as a mesh with faces about a pixel large would often give an inner
    edge, shrinks the silhouettes: the exact meshes of the shapes world then lose 5-8% of their covered area at
    64 px, and a model fitted through such renders grows to make up for it.

    Args:
        colour: (B, H, W, C) the rendered image (e.g. :func:`interpolate` + background), differentiable.
        face_id: (B, H, W) long, the rasterizer's visible faces (-1: background).
        xy: (B, V, 2) the vertices' pixel coordinates (x = column, y = row, centres at +0.5), differentiable.
        depth: (B, H, W) the rasterizer's depth map (no gradient needed).
        faces: (F, 3) long.
        depth_gap: the depth difference (world units) above which two surfaces' pixels are an occlusion edge.
        neighbours: (F, 3) :func:`face_neighbours` of ``faces``, if already known.

    Returns:
        (B, H, W, C) the antialiased image, differentiable w.r.t. ``colour`` and ``xy``.
    """
    B, H, W = face_id.shape
    delta = torch.zeros_like(colour)
    depth = depth.detach()
    if neighbours is None:
        neighbours = face_neighbours(faces)
    with torch.no_grad():  # which way each face turns, per image (its screen-space signed area)
        tri_all = xy.detach()[:, faces]  # (B, F, 3, 2)
        u, v = tri_all[:, :, 1] - tri_all[:, :, 0], tri_all[:, :, 2] - tri_all[:, :, 0]
        area2 = u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
        # +1 / -1: turned one way or the other; 0: degenerate on screen (a sliver seen edge-on), walked through
        facing = torch.where(area2.abs() <= 1e-6, 0, torch.where(area2 > 0, 1, -1))  # (B, F)
    pairs = []  # (b, o row, o col, n row, n col) of every occlusion edge, all four kinds walked at once
    for dim in (2, 1):  # horizontal pairs (o, o + 1 column), then vertical ones (o, o + 1 row)
        n_a = W if dim == 2 else H
        fa, fb = face_id.narrow(dim, 0, n_a - 1), face_id.narrow(dim, 1, n_a - 1)
        za, zb = depth.narrow(dim, 0, n_a - 1), depth.narrow(dim, 1, n_a - 1)
        a_front = (fa >= 0) & ((fb < 0) | (zb - za > depth_gap))  # the edge belongs to a's face
        b_front = (fb >= 0) & ((fa < 0) | (za - zb > depth_gap))
        for front, sign in ((a_front, 1), (b_front, -1)):
            bi, r, c = front.nonzero(as_tuple=True)
            rn, cn = (r, c + 1) if dim == 2 else (r + 1, c)  # the neighbour of (r, c)
            pairs.append((bi, r, c, rn, cn) if sign > 0 else (bi, rn, cn, r, c))
    bi, ro, co, rn, cn = (torch.cat(k) for k in zip(*pairs))
    if bi.numel() == 0:
        return colour
    po = torch.stack([co, ro], -1).to(xy.dtype) + 0.5
    pn = torch.stack([cn, rn], -1).to(xy.dtype) + 0.5
    t = _silhouette_crossing(xy, faces, neighbours, facing, tri_all, bi, face_id[bi, ro, co], po, pn)
    t = t[:, None].to(colour.dtype)  # (P, 1)
    c_o, c_n = colour[bi, ro, co], colour[bi, rn, cn]
    past = t > 0.5
    # the surface reaches past the midpoint: n takes (t - 1/2) of o's colour; else o takes (1/2 - t) of n's
    share_n = torch.where(past, t - 0.5, torch.zeros_like(t)) * (c_o - c_n)
    share_o = torch.where(past, torch.zeros_like(t), 0.5 - t) * (c_n - c_o)
    delta = delta.index_put((bi, rn, cn), share_n, accumulate=True)
    delta = delta.index_put((bi, ro, co), share_o, accumulate=True)
    return colour + delta


def _silhouette_crossing(xy: torch.Tensor, faces: torch.Tensor, neighbours: torch.Tensor, facing: torch.Tensor,
                         tri_all: torch.Tensor, bi: torch.Tensor, face: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                         ) -> torch.Tensor:
    """(P,) where the segments ``a -> b`` cross the silhouette, walking from ``face`` (which covers ``a``) across
    the faces they pass through; in [0, 1], or 0.5 (no blend) where the walk reaches ``b`` on the surface (no
    silhouette between them) or finds no silhouette edge within :data:`MAX_WALK` faces. Differentiable w.r.t.
    ``xy`` (the crossed edge's corners); ``tri_all`` (B, F, 3, 2) is ``xy[:, faces]`` without gradient."""
    P = face.shape[0]
    t = torch.full((P,), 0.5, dtype=xy.dtype, device=xy.device)
    with torch.no_grad():  # the walk: which face each segment leaves through the silhouette, and where it entered
        cur = face.clone()
        todo = torch.arange(P, device=face.device)
        own = facing[bi, face].clone()  # the visible face's turn (0 while only degenerate faces were met)
        entered = torch.zeros(P, dtype=xy.dtype, device=xy.device)  # where the walk entered its current face
        exits: list[torch.Tensor] = []  # segments that leave their current face through the silhouette
        for _ in range(MAX_WALK):
            if todo.numel() == 0:
                break
            f = cur[todo]
            t_exit, edge = _segment_exit(tri_all[bi[todo], f], a[todo], b[todo], entered[todo])
            nb = neighbours[f, edge]
            # the face holds b: the surface runs on, unbroken, from a to b (a steep stretch of it, not an
            # occlusion edge, that the depth gap took for one): no blend
            beyond = ~torch.isfinite(t_exit) | (t_exit >= 1.0)
            turn = facing[bi[todo], nb.clamp_min(0)]
            silhouette = beyond | (nb < 0) | ((turn != own[todo]) & (turn != 0) & (own[todo] != 0))
            exits.append(todo[silhouette & ~beyond])
            walk = todo[~silhouette]
            entered = entered.index_put((walk,), t_exit[~silhouette])
            cur = cur.index_put((walk,), nb[~silhouette])
            own = own.index_put((walk,), torch.where(own[walk] == 0, turn[~silhouette], own[walk]))  # first turn
            todo = walk
    if exits:  # the crossing again, differentiably, on the face that the walk left through the silhouette only
        k = torch.cat(exits)
        t_exit, _ = _segment_exit(xy[bi[k, None], faces[cur[k]]], a[k], b[k], entered[k])
        t = t.index_put((k,), t_exit.clamp(0.0, 1.0))
    return t


_antialias = antialias  # for render_mesh, whose argument of that name shadows it


def texture_sample(texture: torch.Tensor, uv: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample a texture at uv coordinates.

    Args:
        texture: (Ht, Wt, C) shared or (B, Ht, Wt, C); image row 0 is ``v = 1`` (top).
        uv: (B, H, W, 2) in [0, 1], ``(0, 0)`` the bottom-left (trimesh/OBJ convention);
            outside [0, 1] clamps to the border.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        (B, H, W, C), differentiable w.r.t. ``texture`` and ``uv``.
    """
    B = uv.shape[0]
    tex = texture[None] if texture.dim() == 3 else texture
    tex = tex.expand(B, -1, -1, -1).permute(0, 3, 1, 2).to(uv.dtype)
    grid = torch.stack([uv[..., 0] * 2.0 - 1.0, 1.0 - uv[..., 1] * 2.0], dim=-1)
    out = torch.nn.functional.grid_sample(tex, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _background(background: tuple[float, float, float] | torch.Tensor | None, B: int,
                like: torch.Tensor) -> torch.Tensor:
    """(B, 3) background colours (black for None)."""
    if background is None:
        return torch.zeros(B, 3, dtype=like.dtype, device=like.device)
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    return bg.reshape(-1, 3).expand(B, 3)


def render_mesh(verts: torch.Tensor, faces: torch.Tensor, cameras: OrbitCameras, resolution: int,
                colours: torch.Tensor | None = None, uvs: torch.Tensor | None = None,
                texture: torch.Tensor | None = None,
                background: tuple[float, float, float] | torch.Tensor | None = (1.0, 1.0, 1.0),
                lambert: bool = False, cull_backfaces: bool = False, antialias: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a coloured or textured mesh with the project's cameras.

    Args:
        verts: (V, 3) world positions (or (B, V, 3) one mesh per camera).
        faces: (F, 3) long.
        cameras: B cameras.
        resolution: H = W.
        colours: (V, 3) or (B, V, 3) vertex colours; or
        uvs: (V, 2) per-vertex uvs with ``texture`` (Ht, Wt, 3) or (B, Ht, Wt, 3).
            With neither, the mesh is white.
        background: (3,) / (B, 3) colour, or None for black.
        lambert: apply :func:`att3d.render.shading.lambert` (the shapes world's light, ``shared/WORLD.md``:
            ``albedo (0.35 + 0.65 max(0, n.l))``) with smooth vertex normals.
        cull_backfaces: skip faces wound clockwise seen from the camera.
        antialias: antialias the occlusion edges (:func:`antialias`), which gives ``rgb`` silhouette
            gradients w.r.t. ``verts``.

    Returns:
        rgb: (B, H, W, 3); mask: (B, H, W) float foreground (1 covered, 0 background, before antialiasing).
    """
    xy, depth = project_vertices(verts, cameras, resolution)
    rast = rasterize_screen(xy, depth, faces, resolution, cull_backfaces=cull_backfaces)
    B = rast.face_id.shape[0]
    mask = rast.mask[..., None].to(verts.dtype)
    if texture is not None:
        if uvs is None:
            raise ValueError("a texture needs uvs")
        uv = interpolate(uvs, rast, faces)
        albedo = texture_sample(texture, uv)[..., :3]
    elif colours is not None:
        albedo = interpolate(colours, rast, faces)
    else:
        albedo = torch.ones(*rast.face_id.shape, 3, dtype=verts.dtype, device=verts.device)
    if lambert:
        from att3d.mesh.cleanup import vertex_normals

        if verts.dim() == 2:
            normals = vertex_normals(verts, faces)
        else:
            normals = torch.stack([vertex_normals(v, faces) for v in verts])
        n = torch.nn.functional.normalize(interpolate(normals, rast, faces), dim=-1)
        albedo = shade(albedo, n)
    bg = _background(background, B, verts)[:, None, None, :]
    rgb = albedo * mask + bg * (1.0 - mask)
    if antialias:
        rgb = _antialias(rgb, rast.face_id, xy, rast.depth, faces)
    return rgb, mask.squeeze(-1)
