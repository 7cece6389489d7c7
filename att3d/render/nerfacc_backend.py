"""CUDA path of the volume renderer with nerfacc 0.5.3 (imported lazily: only inside functions).

Per prompt, an occupancy grid is computed from that prompt's own field density on the cell
centres of a coarse ``G^3`` grid (thresholded, optionally dilated); rays of prompt ``b`` march
through grid ``b`` with :func:`nerfacc.traverse_grids` (one call per prompt), which skips empty
cells. The packed samples of all prompts are evaluated in one padded field call
``(B, N_max, 3)`` and composited with :func:`nerfacc.render_weight_from_density` and
:func:`nerfacc.accumulate_along_rays` over ``B * R`` rays.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from att3d.render import sampling


class NerfaccUnavailable(RuntimeError):
    """nerfacc or its CUDA extension cannot be used on this machine."""


def require_cuda() -> None:
    """Raise a clear error unless a CUDA device is visible (for ``backend='cuda'``)."""
    if not torch.cuda.is_available():
        raise RuntimeError("VolumeRenderer(backend='cuda') needs a CUDA GPU, but torch.cuda.is_available() is False; "
                           "use backend='torch' or 'auto'")
    if not nerfacc_available():
        raise RuntimeError("VolumeRenderer(backend='cuda') needs the nerfacc package (pip install nerfacc==0.5.3)")


def nerfacc_available() -> bool:
    """Whether the nerfacc Python package imports (its CUDA extension is only built on first use)."""
    try:
        import nerfacc  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


@functools.lru_cache(maxsize=1)
def _cuda_extension_error() -> str | None:
    """None when nerfacc's CUDA extension loads (building it on first use), else why not."""
    try:
        from nerfacc.cuda._backend import _C
    except Exception as e:  # pragma: no cover - needs a GPU machine
        return f"{type(e).__name__}: {e}"
    if _C is None:  # pragma: no cover - nerfacc found no CUDA toolkit
        return "nerfacc found no CUDA toolkit (nvcc) to build its extension"
    return None


def ensure_extension() -> None:
    """Raise :class:`NerfaccUnavailable` unless nerfacc's CUDA extension can be used."""
    if not nerfacc_available():
        raise NerfaccUnavailable("the nerfacc package is not installed")
    err = _cuda_extension_error()
    if err is not None:
        raise NerfaccUnavailable(err)


def cell_centres(resolution: int, bound: float, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(G, G, G, 3) centres of the cells of a G^3 grid over ``[-bound, bound]^3``, indexed ``[x, y, z]``
    (nerfacc's binary grid layout: cell ``i`` spans ``[-bound + i c, -bound + (i + 1) c]``, ``c = 2 bound / G``)."""
    c = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution * 2.0 * bound - bound
    x, y, z = torch.meshgrid(c, c, c, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


@torch.no_grad()
def occupancy_grids(field: nn.Module, cond: dict[str, torch.Tensor], batch: int, resolution: int, bound: float,
                    threshold: float, dilate: int = 1, chunk: int = 2**18,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Per-prompt binary occupancy from the field's density at the cell centres.

    Args:
        field: the field; cond: its conditioning with batch ``batch``.
        resolution: G cells per axis; bound: the grid spans ``[-bound, bound]^3``.
        threshold: a cell is occupied when its density exceeds this.
        dilate: grow the occupied set by this many cells (max-pooling), to be conservative
            about thin features between cell centres.
        chunk: points per prompt per density evaluation.
        device: where to build the grid (default: the device of ``cond``, else of the field's parameters).

    Returns:
        (B, G, G, G) bool, indexed ``[b, ix, iy, iz]``.
    """
    if device is None:
        device = next(iter(cond.values())).device if cond else next(field.parameters()).device
    pts = cell_centres(resolution, bound, device).reshape(1, -1, 3).expand(batch, -1, -1)
    dens = torch.cat([field.density(pts[:, s:s + chunk], cond) for s in range(0, pts.shape[1], chunk)], dim=1)
    occ = (dens > threshold).reshape(batch, 1, resolution, resolution, resolution)
    if dilate > 0:
        k = 2 * dilate + 1
        occ = torch.nn.functional.max_pool3d(occ.float(), kernel_size=k, stride=1, padding=dilate) > 0.5
    return occ.reshape(batch, resolution, resolution, resolution)


def pad_by_prompt(prompt_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int]:
    """Slots of packed samples in a padded (B, N_max) layout.

    Args:
        prompt_ids: (N,) long prompt index of each packed sample, non-decreasing.
        batch: B.

    Returns:
        pos: (N,) position of each sample within its prompt; n_max: the largest count per prompt.
    """
    counts = torch.bincount(prompt_ids, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(prompt_ids.shape[0], device=prompt_ids.device) - starts[prompt_ids]
    n_max = int(counts.max().item()) if prompt_ids.numel() > 0 else 0
    return pos, n_max


def eval_packed(field: nn.Module, cond: dict[str, torch.Tensor], points: torch.Tensor, prompt_ids: torch.Tensor,
                batch: int, density_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluate the field at packed samples of several prompts with one padded call.

    Args:
        points: (N, 3) sample positions; prompt_ids: (N,) non-decreasing prompt of each sample.

    Returns:
        density (N,), rgb (N, 3) (None when ``density_only``).
    """
    pos, n_max = pad_by_prompt(prompt_ids, batch)
    padded = points.new_zeros(batch, max(n_max, 1), 3)
    padded[prompt_ids, pos] = points
    if density_only:
        return field.density(padded, cond)[prompt_ids, pos], None
    density, rgb = field(padded, cond)
    return density[prompt_ids, pos], rgb[prompt_ids, pos]


def march(rays_o: torch.Tensor, rays_d: torch.Tensor, binaries: torch.Tensor, bound: float, step_size: float,
          stratified: bool, generator: torch.Generator | None = None, near: torch.Tensor | None = None,
          far: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ray marching through per-prompt occupancy grids with :func:`nerfacc.traverse_grids`.

    Args:
        rays_o, rays_d: (B, R, 3) rays (unit directions); binaries: (B, G, G, G) bool.
        step_size: marching step; stratified: jitter each ray's start by up to one step.
        near, far: optional (B, R) limits of the marched segment (inside the box in any case).

    Returns:
        ray_indices (N,) long in ``[0, B * R)`` (prompt b's rays are ``b * R + r``), sorted;
        t_starts (N,); t_ends (N,).
    """
    import nerfacc

    B, R, _ = rays_o.shape
    aabb = torch.tensor([[-bound, -bound, -bound, bound, bound, bound]], device=rays_o.device, dtype=torch.float32)
    idx_all, ts_all, te_all = [], [], []
    for b in range(B):
        ro = rays_o[b].contiguous().float()
        rd = rays_d[b].contiguous().float()
        near_b = torch.zeros(R, device=ro.device, dtype=ro.dtype) if near is None else near[b].float()
        far_b = torch.full_like(near_b, 1e10) if far is None else far[b].float()
        if stratified:
            near_b = near_b + sampling._rand((R,), near_b, generator) * step_size
        intervals, samples, _ = nerfacc.traverse_grids(ro, rd, binaries[b:b + 1].contiguous(), aabb,
                                                       near_planes=near_b.contiguous(),
                                                       far_planes=far_b.contiguous(), step_size=step_size,
                                                       cone_angle=0.0)
        t_starts = intervals.vals[intervals.is_left]
        t_ends = intervals.vals[intervals.is_right]
        idx_all.append(samples.ray_indices.long() + b * R)
        ts_all.append(t_starts)
        te_all.append(t_ends)
    return torch.cat(idx_all), torch.cat(ts_all), torch.cat(te_all)


def render_rays_nerfacc(field: nn.Module, cond: dict[str, torch.Tensor], rays_o: torch.Tensor, rays_d: torch.Tensor,
                        bound: float, occ_resolution: int = 64, occ_threshold: float = 0.01, occ_dilate: int = 1,
                        step_size: float = 2 * 3**0.5 / 512, stratified: bool = False, early_stop_eps: float = 1e-4,
                        generator: torch.Generator | None = None, binaries: torch.Tensor | None = None,
                        near: torch.Tensor | None = None, far: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Render rays of B prompts with nerfacc.

    Args:
        field, cond: the field and its per-prompt conditioning (batch B).
        rays_o, rays_d: (B, R, 3) rays (unit directions), on a CUDA device.
        bound: scene box half-size; occ_*: occupancy grid settings (see :func:`occupancy_grids`).
        step_size: marching step; stratified: jitter the starts; early_stop_eps: drop samples whose
            transmittance is below this (one extra density pass without gradients; 0 disables).
        binaries: precomputed (B, G, G, G) occupancy (else computed here).
        near, far: optional (B, R) limits of the rendered segment of each ray (e.g. a bounding sphere);
            a ray with ``near >= far`` gets no samples.

    Returns:
        dict with ``rgb`` (B, R, 3) premultiplied (no background), ``opacity`` (B, R), ``depth`` (B, R).
    """
    ensure_extension()
    import nerfacc

    B, R, _ = rays_o.shape
    n_rays = B * R
    if binaries is None:
        binaries = occupancy_grids(field, cond, B, occ_resolution, bound, occ_threshold, occ_dilate,
                                   device=rays_o.device)
    with torch.no_grad():
        ray_indices, t_starts, t_ends = march(rays_o, rays_d, binaries, bound, step_size, stratified, generator,
                                              near, far)
    flat_o = rays_o.reshape(n_rays, 3)
    flat_d = rays_d.reshape(n_rays, 3)

    def positions(idx: torch.Tensor, ts: torch.Tensor, te: torch.Tensor) -> torch.Tensor:
        return flat_o[idx] + flat_d[idx] * (0.5 * (ts + te))[:, None]

    if early_stop_eps > 0 and ray_indices.numel() > 0:
        with torch.no_grad():
            sig, _ = eval_packed(field, cond, positions(ray_indices, t_starts, t_ends), ray_indices // R, B,
                                 density_only=True)
            keep = nerfacc.render_visibility_from_density(t_starts, t_ends, sig.float(), ray_indices=ray_indices,
                                                          n_rays=n_rays, early_stop_eps=early_stop_eps)
        ray_indices, t_starts, t_ends = ray_indices[keep], t_starts[keep], t_ends[keep]

    if ray_indices.numel() == 0:
        # Nothing to render; keep the outputs attached to the field so that backward() still works.
        density, rgb = field(rays_o.new_zeros(B, 1, 3), cond)
        zero = (density.sum() + rgb.sum()) * 0.0
        return {"rgb": rays_o.new_zeros(B, R, 3) + zero, "opacity": rays_o.new_zeros(B, R) + zero,
                "depth": rays_o.new_zeros(B, R) + zero}

    density, rgb = eval_packed(field, cond, positions(ray_indices, t_starts, t_ends), ray_indices // R, B)
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, density.float(), ray_indices=ray_indices,
                                                       n_rays=n_rays)
    colour = nerfacc.accumulate_along_rays(weights, values=rgb.float(), ray_indices=ray_indices, n_rays=n_rays)
    opacity = nerfacc.accumulate_along_rays(weights, values=None, ray_indices=ray_indices, n_rays=n_rays)
    depth = nerfacc.accumulate_along_rays(weights, values=(0.5 * (t_starts + t_ends))[:, None],
                                          ray_indices=ray_indices, n_rays=n_rays)
    depth = depth / opacity.clamp(min=1e-6)
    return {"rgb": colour.reshape(B, R, 3), "opacity": opacity.reshape(B, R), "depth": depth.reshape(B, R)}
