"""Ground-truth renderer of the shapes world: batched sphere tracing in torch (CPU and GPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from att3d.render.cameras import OrbitCameras
from att3d.render.shading import lambert  # WORLD.md shading: its defaults are the world's light
from att3d.world.shapes import BOUND_RADIUS, COLOURS, SDFS, WorldObject


def sdf_normals(sdf: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Outward unit normals by central differences. points: (N, 3) -> (N, 3)."""
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
    grads = [sdf(points + offsets[i]) - sdf(points - offsets[i]) for i in range(3)]
    return torch.nn.functional.normalize(torch.stack(grads, dim=-1), dim=-1)


def sphere_trace(sdf: Callable[[torch.Tensor], torch.Tensor], rays_o: torch.Tensor, rays_d: torch.Tensor,
                 max_steps: int = 128, hit_eps: float = 1e-4,
                 bound: float = BOUND_RADIUS) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace rays against an SDF inside the ball of radius ``bound``.

    Args:
        rays_o: (N, 3) origins; rays_d: (N, 3) unit directions.

    Returns:
        hit: (N,) bool; t: (N,) distance along the ray to the surface (valid where hit).
    """
    # Entry and exit of the bounding ball.
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - bound * bound
    disc = b * b - c
    crosses = disc > 0
    sq = disc.clamp(min=0).sqrt()
    t_near = (-b - sq).clamp(min=0.0)
    t_far = -b + sq
    t = t_near.clone()
    hit = torch.zeros_like(crosses)
    active = crosses.clone()
    for _ in range(max_steps):
        idx = active.nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            break
        d = sdf(rays_o[idx] + t[idx, None] * rays_d[idx])
        t[idx] = t[idx] + d
        done_hit = d < hit_eps
        done_miss = t[idx] > t_far[idx]
        hit[idx[done_hit]] = True
        active[idx[done_hit | done_miss]] = False
    return hit & crosses, t


def render_objects(objects: Sequence[WorldObject], cameras: OrbitCameras, resolution: int,
                   max_steps: int = 128) -> dict[str, torch.Tensor]:
    """Render one object per camera.

    Args:
        objects: B objects; cameras: B cameras.

    Returns:
        dict with ``rgb`` (B, H, W, 3) in [0, 1] on a white background, ``mask`` (B, H, W) float
        foreground, ``depth`` (B, H, W) ray distance (0 on the background) and ``normal`` (B, H, W, 3).
    """
    if len(objects) != len(cameras):
        raise ValueError(f"{len(objects)} objects for {len(cameras)} cameras")
    rays_o, rays_d = cameras.rays(resolution)
    B, H, W, _ = rays_o.shape
    device = rays_o.device
    rgb = torch.ones(B, H, W, 3, device=device)
    mask = torch.zeros(B, H, W, device=device)
    depth = torch.zeros(B, H, W, device=device)
    normal = torch.zeros(B, H, W, 3, device=device)
    shapes = sorted({o.shape for o in objects})
    for shape in shapes:
        sel = torch.tensor([o.shape == shape for o in objects], device=device)
        ro = rays_o[sel].reshape(-1, 3)
        rd = rays_d[sel].reshape(-1, 3)
        hit, t = sphere_trace(SDFS[shape], ro, rd, max_steps=max_steps)
        pts = ro + t[:, None] * rd
        n = torch.zeros_like(pts)
        if hit.any():
            n[hit] = sdf_normals(SDFS[shape], pts[hit])
        albedo = torch.tensor([COLOURS[o.colour] for o in objects if o.shape == shape], device=device)
        albedo = albedo[:, None, :].expand(-1, H * W, -1).reshape(-1, 3)
        shaded = torch.where(hit[:, None], lambert(albedo, n), torch.ones_like(albedo))
        rgb[sel] = shaded.reshape(-1, H, W, 3)
        mask[sel] = hit.float().reshape(-1, H, W)
        depth[sel] = torch.where(hit, t, torch.zeros_like(t)).reshape(-1, H, W)
        normal[sel] = n.reshape(-1, H, W, 3)
    return {"rgb": rgb, "mask": mask, "depth": depth, "normal": normal}


def voxel_centres(resolution: int = 64, device: torch.device | str | None = None) -> torch.Tensor:
    """(R, R, R, 3) centres of the R^3 voxel grid over [-1, 1]^3, indexed [x, y, z]."""
    c = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution * 2.0 - 1.0
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def occupancy(obj: WorldObject, resolution: int = 64, device: torch.device | str | None = None) -> torch.Tensor:
    """(R, R, R) bool ground-truth occupancy (SDF < 0) on the voxel centres."""
    return obj.sdf(voxel_centres(resolution, device)) < 0
