"""Ray sampling and alpha compositing in pure torch (the CPU path of the volume renderer).

Samples along a ray are described by sorted positions ``t`` (..., S) and the interval
``[t_start, t_end)`` each one stands for; compositing uses
``alpha_i = 1 - exp(-sigma_i (t_end_i - t_start_i))`` and the transmittance
``T_i = exp(-sum_{j<i} sigma_j delta_j)``.
"""

from __future__ import annotations

import torch


def _rand(shape: tuple[int, ...], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) noise of ``shape`` on ``like``'s device and dtype, drawn from ``generator`` (any device).

    ``generator`` may also be a batch-sliced source with ``rand(shape, dtype)`` (``att3d.train.distributed.BatchSlice``:
    draws for the global batch of a data-parallel step and keeps this rank's rows).
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        return generator.rand(shape, dtype=like.dtype).to(like.device)
    gen_device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=like.dtype).to(like.device)


def ray_box_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor,
                      bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit of rays through the box ``[-bound, bound]^3`` (slab method).

    Args:
        rays_o: (..., 3) origins; rays_d: (..., 3) directions (need not be unit; t is in their units).

    Returns:
        near: (...) entry distance clamped to >= 0; far: (...) exit distance; hit: (...) bool.
        Where a ray misses, ``near == far == 0``.
    """
    tiny = 1e-9
    d = torch.where(rays_d.abs() < tiny, torch.full_like(rays_d, tiny), rays_d)
    inv = 1.0 / d
    t0 = (-bound - rays_o) * inv
    t1 = (bound - rays_o) * inv
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def ray_sphere_intersect(rays_o: torch.Tensor, rays_d: torch.Tensor,
                         radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entry and exit of rays through the ball of ``radius`` at the origin.

    Args:
        rays_o: (..., 3) origins; rays_d: (..., 3) unit directions.

    Returns:
        near: (...) clamped to >= 0; far: (...); hit: (...) bool (``near == far == 0`` on a miss).
    """
    b = (rays_o * rays_d).sum(-1)
    c = rays_o.square().sum(-1) - radius * radius
    disc = b * b - c
    sq = disc.clamp(min=0.0).sqrt()
    near = (-b - sq).clamp(min=0.0)
    far = -b + sq
    hit = (disc > 0) & (far > near)
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def uniform_bins(near: torch.Tensor, far: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Edges of ``num_samples`` equal bins between ``near`` and ``far``. (...) -> (..., S + 1)."""
    u = torch.linspace(0.0, 1.0, num_samples + 1, device=near.device, dtype=near.dtype)
    return near[..., None] + (far - near)[..., None] * u


def stratified_samples(edges: torch.Tensor, stratified: bool,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per bin: uniformly jittered inside it (``stratified``) or at its centre.

    Args:
        edges: (..., S + 1) sorted bin edges.

    Returns:
        (..., S) sorted sample positions.
    """
    lo, hi = edges[..., :-1], edges[..., 1:]
    if stratified:
        u = _rand(tuple(lo.shape), lo, generator)
    else:
        u = torch.full_like(lo, 0.5)
    return lo + (hi - lo) * u


def sample_pdf(edges: torch.Tensor, weights: torch.Tensor, num_samples: int, stratified: bool = False,
               generator: torch.Generator | None = None, eps: float = 1e-5) -> torch.Tensor:
    """Importance samples by inverse transform of the piecewise-constant pdf of bin weights.

    The weights are detached: the coarse pass only decides where to look.

    Args:
        edges: (..., S + 1) sorted bin edges; weights: (..., S) non-negative bin weights.
        num_samples: K new samples per ray.
        stratified: jitter the uniform quantiles (training) or use their centres (evaluation).

    Returns:
        (..., K) sorted positions inside ``[edges[..., 0], edges[..., -1]]``.
    """
    w = weights.detach() + eps
    pdf = w / w.sum(-1, keepdim=True)
    cdf = torch.cumsum(pdf, -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf], -1).clamp(max=1.0)  # (..., S + 1)
    shape = (*cdf.shape[:-1], num_samples)
    base = torch.arange(num_samples, device=cdf.device, dtype=cdf.dtype)
    jitter = _rand(shape, cdf, generator) if stratified else torch.full(shape, 0.5, device=cdf.device, dtype=cdf.dtype)
    u = ((base + jitter) / num_samples).contiguous()
    idx = torch.searchsorted(cdf.contiguous(), u, right=True)
    below = (idx - 1).clamp(0, cdf.shape[-1] - 1)
    above = idx.clamp(0, cdf.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, below), cdf.gather(-1, above)
    e0, e1 = edges.detach().gather(-1, below), edges.detach().gather(-1, above)
    denom = c1 - c0
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)
    frac = ((u - c0) / denom).clamp(0.0, 1.0)
    return e0 + frac * (e1 - e0)


def intervals_from_samples(t: torch.Tensor, near: torch.Tensor,
                           far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals of sorted samples: edges at the midpoints between neighbours, clamped to ``[near, far]``.

    Args:
        t: (..., S) sorted positions; near, far: (...).

    Returns:
        t_starts, t_ends: (..., S), tiling ``[near, far]``.
    """
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    edges = torch.cat([near[..., None], mids, far[..., None]], dim=-1)
    edges = torch.maximum(edges, near[..., None])
    edges = torch.minimum(edges, far[..., None])
    return edges[..., :-1], edges[..., 1:]


def composite(density: torch.Tensor, rgb: torch.Tensor, t_starts: torch.Tensor,
              t_ends: torch.Tensor) -> dict[str, torch.Tensor]:
    """Alpha compositing along rays.

    Args:
        density: (..., S) >= 0; rgb: (..., S, 3); t_starts, t_ends: (..., S) sample intervals.

    Returns:
        dict with ``weights`` (..., S), ``rgb`` (..., 3) (premultiplied: no background),
        ``opacity`` (...) and ``depth`` (...) = sum(w t) / opacity (0 where nothing is hit).
    """
    sigma_delta = density * (t_ends - t_starts).clamp(min=0.0)
    alpha = 1.0 - torch.exp(-sigma_delta)
    acc = torch.cumsum(sigma_delta, dim=-1)
    trans = torch.exp(-(acc - sigma_delta))  # exclusive sum: transmittance before each sample
    weights = trans * alpha
    opacity = weights.sum(-1)
    colour = (weights[..., None] * rgb).sum(-2)
    t_mid = 0.5 * (t_starts + t_ends)
    depth = (weights * t_mid).sum(-1) / opacity.clamp(min=1e-6)
    return {"weights": weights, "rgb": colour, "opacity": opacity, "depth": depth}


def background_tensor(background: tuple[float, float, float] | list[float] | torch.Tensor | None, batch: int,
                      device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Normalise a background spec to (B, 3) (or None for no background: premultiplied colours)."""
    if background is None:
        return None
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.dim() == 1:
        bg = bg.expand(batch, 3)
    if bg.shape != (batch, 3):
        raise ValueError(f"background must be (3,) or ({batch}, 3), got {tuple(bg.shape)}")
    return bg


def add_background(rgb: torch.Tensor, opacity: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
    """``rgb + (1 - opacity) * background``.

    Args:
        rgb: (B, R, 3) premultiplied colours; opacity: (B, R); background: (B, 3) or None.
    """
    if background is None:
        return rgb
    return rgb + (1.0 - opacity)[..., None] * background[:, None, :]
