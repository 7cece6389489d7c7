"""The volume renderer: fields + orbit cameras -> images, with a torch path (CPU/GPU) and a nerfacc path (CUDA).

``renderer(field, cond, cameras, resolution, background) -> {rgb (B,H,W,3), opacity (B,H,W), depth (B,H,W)}``.
Prompt ``b`` of the field (``cond[...][b]``) is seen by camera ``b``.

Torch path: the ray's segment inside the sampled region (a ball, or the scene box) is cut into ``num_samples`` bins
with one sample each (jittered in training, centred in evaluation); with ``num_importance > 0`` a
coarse pass without gradients finds the weights, ``num_importance`` more samples are drawn from
them by inverse CDF, and the merged, sorted set is rendered with gradients.

CUDA path (:mod:`att3d.render.nerfacc_backend`): per-prompt occupancy grids from the field's own
density and nerfacc's grid traversal (empty space skipped), then compositing of the packed samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from att3d.registry import RENDERERS
from att3d.render import nerfacc_backend, sampling
from att3d.render.cameras import OrbitCameras

log = logging.getLogger(__name__)

Background = tuple[float, float, float] | Sequence[float] | torch.Tensor | None
BACKENDS = ("auto", "torch", "cuda")


@RENDERERS.register("volume")
class VolumeRenderer(nn.Module):
    """Differentiable volume renderer.

    Args:
        backend: ``auto`` (nerfacc on CUDA tensors when its extension works, else torch), ``torch`` or ``cuda``.
        num_samples: S, samples per ray of the torch path (stratified bins).
        num_importance: extra samples per ray from the coarse weights (torch path; 0 disables the coarse pass).
        stratified: jitter samples in training (``self.training``); evaluation is always deterministic.
        region: where rays are sampled: ``sphere`` (a ball at the origin) or ``box`` (the field's
            ``[-bound, bound]^3``).
        sphere_radius: radius of the ``sphere`` region (1: the ball inscribed in the default box ``[-1, 1]^3``);
            None: ``sqrt(3) * bound``, the box's circumscribed ball.
        occ_resolution: cells per axis of the per-prompt occupancy grids of the CUDA path.
        occ_threshold: density above which a cell is occupied (CUDA path).
        occ_dilate: grow occupied regions by this many cells (CUDA path; conservative skipping).
        march_steps: the CUDA path's step size is the box diagonal / ``march_steps``.
        early_stop_eps: CUDA path: drop samples behind transmittance below this (0 disables; one more
            density evaluation without gradients).
        chunk_rays: rays per prompt per chunk in :meth:`render_chunked`.

    Shapes: ``renderer(field, cond, cameras (B), resolution)`` gives ``rgb (B, H, W, 3)``, ``opacity (B, H, W)``
    and ``depth (B, H, W)`` with ``H = W = resolution``; :meth:`render_rays` does the same for rays (B, R, 3).
    """

    def __init__(self, backend: str = "auto", num_samples: int = 48, num_importance: int = 0,
                 stratified: bool = True, region: str = "sphere", sphere_radius: float | None = 1.0,
                 occ_resolution: int = 64, occ_threshold: float = 0.01, occ_dilate: int = 1, march_steps: int = 512,
                 early_stop_eps: float = 1e-4, chunk_rays: int = 4096):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if region not in ("box", "sphere"):
            raise ValueError(f"region must be 'box' or 'sphere', got {region!r}")
        if backend == "cuda":
            nerfacc_backend.require_cuda()
        if num_samples < 1 or num_importance < 0:
            raise ValueError(f"need num_samples >= 1 and num_importance >= 0, got {num_samples}, {num_importance}")
        self.backend = backend
        self.num_samples = int(num_samples)
        self.num_importance = int(num_importance)
        self.stratified = bool(stratified)
        self.region = region
        self.sphere_radius = sphere_radius
        self.occ_resolution = int(occ_resolution)
        self.occ_threshold = float(occ_threshold)
        self.occ_dilate = int(occ_dilate)
        self.march_steps = int(march_steps)
        self.early_stop_eps = float(early_stop_eps)
        self.chunk_rays = int(chunk_rays)
        self._auto_cuda_failed = False

    # -- backend choice ----------------------------------------------------------------------

    def resolve_backend(self, device: torch.device) -> str:
        """``torch`` or ``cuda`` for rays on ``device``."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "cuda":
            if device.type != "cuda":
                raise ValueError(f"VolumeRenderer(backend='cuda') got rays on {device}; move cameras, field and "
                                 "conditioning to a CUDA device, or use backend='torch'")
            return "cuda"
        if device.type == "cuda" and not self._auto_cuda_failed and nerfacc_backend.nerfacc_available():
            return "cuda"
        return "torch"

    # -- rendering ---------------------------------------------------------------------------

    def region_radius(self, bound: float) -> float | None:
        """The radius of the ball that every ray sample lies in (``region="sphere"``), or None (``box``: the whole
        box is sampled). A field's density outside it is never rendered, so nothing trains it."""
        if self.region != "sphere":
            return None
        return float(self.sphere_radius) if self.sphere_radius is not None else math.sqrt(3.0) * float(bound)

    def ray_segments(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                     bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, 3) rays -> near, far (B, R) of the sampled region (``near == far`` on a miss)."""
        if self.region == "sphere":
            radius = self.sphere_radius if self.sphere_radius is not None else math.sqrt(3.0) * bound
            near, far, _ = sampling.ray_sphere_intersect(rays_o, rays_d, radius)
        else:
            near, far, _ = sampling.ray_box_intersect(rays_o, rays_d, bound)
        return near, far

    def _points(self, rays_o: torch.Tensor, rays_d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, R, 3), (B, R, 3), (B, R, S) -> (B, R * S, 3)."""
        B, R, S = t.shape
        return (rays_o[:, :, None, :] + t[..., None] * rays_d[:, :, None, :]).reshape(B, R * S, 3)

    def sample_rays(self, field: nn.Module, cond: dict[str, torch.Tensor], rays_o: torch.Tensor,
                    rays_d: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample positions of the torch path (coarse bins, then importance samples when enabled).

        Args:
            rays_o, rays_d: (B, R, 3).

        Returns:
            t: (B, R, S') sorted positions; t_starts, t_ends: (B, R, S') the intervals they stand for
            (``S' = num_samples + num_importance``).
        """
        B, R, _ = rays_o.shape
        jitter = self.stratified and self.training
        near, far = self.ray_segments(rays_o, rays_d, float(field.bound))
        edges = sampling.uniform_bins(near, far, self.num_samples)  # (B, R, S+1)
        t = sampling.stratified_samples(edges, jitter, generator)  # (B, R, S)
        if self.num_importance <= 0:
            return t, edges[..., :-1], edges[..., 1:]
        with torch.no_grad():  # coarse pass: only decides where to look
            sigma = field.density(self._points(rays_o, rays_d, t), cond).reshape(B, R, -1)
            zeros = sigma.new_zeros(*sigma.shape, 3)
            w = sampling.composite(sigma, zeros, edges[..., :-1], edges[..., 1:])["weights"]
        t_fine = sampling.sample_pdf(edges, w, self.num_importance, stratified=jitter, generator=generator)
        t = torch.sort(torch.cat([t, t_fine], dim=-1), dim=-1).values
        t_starts, t_ends = sampling.intervals_from_samples(t, near, far)
        return t, t_starts, t_ends

    def render_rays_torch(self, field: nn.Module, cond: dict[str, torch.Tensor], rays_o: torch.Tensor,
                          rays_d: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Torch path. rays: (B, R, 3) -> rgb (B, R, 3) premultiplied, opacity (B, R), depth (B, R)."""
        B, R, _ = rays_o.shape
        t, t_starts, t_ends = self.sample_rays(field, cond, rays_o, rays_d, generator)
        density, rgb = field(self._points(rays_o, rays_d, t), cond)
        S = t.shape[-1]
        out = sampling.composite(density.reshape(B, R, S), rgb.reshape(B, R, S, 3), t_starts, t_ends)
        return {"rgb": out["rgb"], "opacity": out["opacity"], "depth": out["depth"]}

    def render_rays(self, field: nn.Module, cond: dict[str, torch.Tensor], rays_o: torch.Tensor,
                    rays_d: torch.Tensor, background: Background = (1.0, 1.0, 1.0),
                    generator: torch.Generator | None = None,
                    occupancy: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Render rays of B prompts.

        Args:
            field: the field (``field(points (B,N,3), cond) -> density (B,N), rgb (B,N,3)``, ``field.bound``).
            cond: per-prompt conditioning, batch B.
            rays_o, rays_d: (B, R, 3) origins and unit directions (ray b of prompt b).
            background: (3,), (B, 3) or None (premultiplied colours, i.e. black).
            generator: random source of the stratified jitter.
            occupancy: CUDA path only: precomputed (B, G, G, G) bool grids (see :meth:`occupancy_grids`).

        Returns:
            dict with ``rgb`` (B, R, 3), ``opacity`` (B, R), ``depth`` (B, R).
        """
        B = rays_o.shape[0]
        bg = sampling.background_tensor(background, B, rays_o.device, rays_o.dtype)
        out = None
        if self.resolve_backend(rays_o.device) == "cuda":
            near, far = self.ray_segments(rays_o, rays_d, float(field.bound))
            try:
                out = nerfacc_backend.render_rays_nerfacc(
                    field, cond, rays_o, rays_d, bound=float(field.bound), occ_resolution=self.occ_resolution,
                    occ_threshold=self.occ_threshold, occ_dilate=self.occ_dilate,
                    step_size=2.0 * math.sqrt(3.0) * float(field.bound) / self.march_steps,
                    stratified=self.stratified and self.training, early_stop_eps=self.early_stop_eps,
                    generator=generator, binaries=occupancy, near=near, far=far)
            except nerfacc_backend.NerfaccUnavailable as e:
                if self.backend == "cuda":
                    raise RuntimeError(f"VolumeRenderer(backend='cuda'): {e}") from e
                log.warning("nerfacc's CUDA extension is unavailable (%s); rendering with the torch backend", e)
                self._auto_cuda_failed = True
        if out is None:
            out = self.render_rays_torch(field, cond, rays_o, rays_d, generator)
        out["rgb"] = sampling.add_background(out["rgb"], out["opacity"], bg)
        return out

    def occupancy_grids(self, field: nn.Module, cond: dict[str, torch.Tensor], batch: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
        """(B, G, G, G) bool occupancy of the CUDA path (from the field's density; no gradients)."""
        return nerfacc_backend.occupancy_grids(field, cond, batch, self.occ_resolution, float(field.bound),
                                               self.occ_threshold, self.occ_dilate, device=device)

    def forward(self, field: nn.Module, cond: dict[str, torch.Tensor], cameras: OrbitCameras, resolution: int,
                background: Background = (1.0, 1.0, 1.0),
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Render one image per prompt: camera b looks at prompt b.

        Returns:
            dict with ``rgb`` (B, H, W, 3), ``opacity`` (B, H, W), ``depth`` (B, H, W) (H = W = ``resolution``).
        """
        rays_o, rays_d = cameras.rays(resolution)
        B, H, W, _ = rays_o.shape
        out = self.render_rays(field, cond, rays_o.reshape(B, H * W, 3), rays_d.reshape(B, H * W, 3), background,
                               generator)
        return {k: v.reshape(B, H, W, *v.shape[2:]) for k, v in out.items()}

    @torch.no_grad()
    def render_chunked(self, field: nn.Module, cond: dict[str, torch.Tensor], cameras: OrbitCameras,
                       resolution: int, background: Background = (1.0, 1.0, 1.0),
                       chunk_rays: int | None = None) -> dict[str, torch.Tensor]:
        """Evaluation render at a higher resolution in chunks of rays, without gradients, deterministic.

        Returns:
            the same dict as :meth:`forward` (B, H, W, ...).
        """
        chunk = int(chunk_rays or self.chunk_rays)
        was_training = self.training
        self.eval()
        try:
            rays_o, rays_d = cameras.rays(resolution)
            B, H, W, _ = rays_o.shape
            rays_o, rays_d = rays_o.reshape(B, H * W, 3), rays_d.reshape(B, H * W, 3)
            occ = None
            if self.resolve_backend(rays_o.device) == "cuda":
                occ = self.occupancy_grids(field, cond, B, rays_o.device)  # once for all chunks
            parts: list[dict[str, torch.Tensor]] = []
            for s in range(0, H * W, chunk):
                parts.append(self.render_rays(field, cond, rays_o[:, s:s + chunk], rays_d[:, s:s + chunk],
                                              background, occupancy=occ))
            out = {k: torch.cat([p[k] for p in parts], dim=1) for k in parts[0]}
        finally:
            self.train(was_training)
        return {k: v.reshape(B, H, W, *v.shape[2:]) for k, v in out.items()}
