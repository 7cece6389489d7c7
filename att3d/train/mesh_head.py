"""LATTE3D's second stage: a textured-mesh head refined with score distillation, amortized over a prompt set.

Starting from a trained amortized NeRF model (an :class:`~att3d.model.AmortizedModel` folder), every
prompt gets a surface mesh from a DMTet tetrahedral grid, and the model is refined so that the
*meshes* it produces (not its volume renders) look right to the same diffusion prior::

    text --> mapping --> field conditioning cond_b                                  (per prompt, amortized)
    tet grid (R^3 vertices) --> sdf = threshold - density(vertex, cond_b)           (DMTet initialisation)
    marching_tetrahedra(sdf) --> mesh (V, 3), (F, 3)                               (differentiable)
    rasterize(mesh, camera_b) at H (e.g. 64) --> surface point per pixel            (pure-torch rasterizer)
    pixel colour = field rgb at the surface point (moved ``colour_offset`` inside), no extra shading
                   (the colour field already holds the world's fixed lighting), composited on the background
    SDS(prior at its resolution, e.g. 32)                                           (the render is downsampled)

**SDF from the density.** A point is inside when the NeRF's density exceeds the extraction threshold
(``model.config["extraction"]["threshold"]``), so the tet grid's signed function is the *linear* form
``sdf = threshold - density`` (negative inside). Marching tetrahedra puts a surface vertex at the linear
zero crossing of ``sdf`` along each crossed edge, i.e. where the linearly interpolated density equals the
threshold, exactly as ``att3d generate`` (marching cubes on the density grid) does; so the surface that
the mesh head trains is the surface that generation exports. (A log-density form,
``log threshold - log density``, spreads the values more evenly but moves the interpolated crossing away
from the one marching cubes finds.) Grid vertices on the faces of the field's box are outside, so every
surface closes. It is not a distance, which DMTet does not need: only its sign and its linear crossings.

**What is trained.** Only the model's own parameters (the mapping network and the shared field), so the
result is a plain model folder that ``att3d.load`` / ``att3d generate`` read (the stage is recorded in
the folder's ``extra``). Two modes:

* texture (default): the geometry is that of the starting model (its meshes are extracted once per
  prompt and kept fixed); the SDS gradient reaches the colour field through the rasterizer's
  interpolated surface points. Since density and colour share the grids and the MLP, an *anchor*
  loss keeps the density where it was: ``anchor_weight * mean((log1p d - log1p d0)^2)`` over
  ``anchor_points`` points per prompt per step (half near the starting surface, half uniform in the
  box; ``d0`` the starting model's density), so that generation still extracts the same shapes.
* geometry (``--geometry``): the mesh is re-extracted every step from the current density, and the
  SDS gradient also reaches the density through the mesh vertices (marching tetrahedra is
  differentiable in ``sdf``; the rasterizer's barycentrics in the vertex positions). The density is
  re-evaluated with gradients only at the vertices of crossed tetrahedra. DMTet's per-vertex
  deformations are *not* used: a plain model folder has nowhere to keep them and ``att3d generate``
  would ignore them. The anchor (if its weight is > 0) then acts as a regulariser towards the start.

Gradients: the rasterizer has no silhouette (antialiasing) gradients, so geometry moves through the
interior of the rendered surface only (the colour lookup position and the barycentrics).

**Resolution.** The mesh is rendered at ``trainer.resolution`` (64 by default, twice the NeRF stage's
32); the prior's :meth:`~att3d.guidance.priors.DiffusionPrior.encode_images` resizes every render to the
prior's own resolution with antialiased bilinear filtering (an area-like filter when shrinking), inside
the SDS loss, so the downsampling is differentiable and no pixel is dropped.

**Training loop.** :class:`MeshHeadTrainer` is a :class:`~att3d.train.trainer.Trainer` with its own
:meth:`~MeshHeadTrainer.train_step`: a batch of different prompts per step, each with its own random
camera, drawn from one seeded generator; checkpoints (model folder, optimiser, RNG, step), exact resume,
SIGINT / SIGTERM handling, non-finite step skipping, ``metrics.jsonl`` and TensorBoard are the trainer's.
One process only (no ``torchrun``) and no interpolation mixing (a mixture has no mesh of its own here).
``trainer.opacity_reg``, ``trainer.entropy_reg`` and ``trainer.mixed_precision`` do not apply.

Command line (defaults from ``configs/experiment/mesh_head.yaml``)::

    python -m att3d.train.mesh_head --init-from assets/att3d-shapes64 --prompts shapes64_train \\
        --steps 500 --resolution 64 --out runs/mesh_head [--prior assets/shapes-prior] [--geometry]

writes ``OUT/model/`` (the refined model folder), ``OUT/checkpoints/``, ``OUT/metrics.jsonl`` and
``OUT/mesh_head.json`` (the run's settings); running it again with the same ``--out`` resumes.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from att3d.mesh import interpolate, marching_tetrahedra, rasterize, tet_grid, vertex_normals
from att3d.model import AmortizedModel
from att3d.render.cameras import OrbitCameras
from att3d.text.prompts import PromptBank
from att3d.train.trainer import Trainer, TrainerConfig
from att3d.utils.errors import Att3dError

log = logging.getLogger(__name__)

#: The value of ``extra["stage"]`` in a model folder written by the mesh head.
STAGE = "mesh_head"
#: The grid resolution of ``att3d generate`` by default (its colour is read one cell of it inside the surface).
GENERATE_GRID_RESOLUTION = 128


class MeshHeadError(Att3dError):
    """The mesh head cannot run as asked (bad option, no surface to texture)."""


@dataclass
class MeshHeadConfig:
    """Settings of the mesh head (section ``mesh_head`` of ``configs/experiment/mesh_head.yaml``).

    Attributes:
        tet_resolution: vertices per axis of the DMTet grid over the field's box (``6 (R-1)^3`` tetrahedra).
        geometry: also refine the geometry (the density) through the mesh; False: texture only.
        anchor_weight: weight of the density anchor (keeps the starting model's density; 0: off).
        anchor_points: points per prompt and step of the anchor.
        anchor_band: std of the near-surface anchor points' offsets along the normal, in tet grid cells.
        colour_offset: how far inside the surface (world units, along the inward normal) the colour is read;
            None: one cell of ``att3d generate``'s default 128^3 grid (``2 bound / 127``), where generation
            reads the colour it bakes into the texture.
    """

    tet_resolution: int = 64
    geometry: bool = False
    anchor_weight: float = 1.0
    anchor_points: int = 2048
    anchor_band: float = 2.0
    colour_offset: float | None = None

    def validate(self) -> MeshHeadConfig:
        """Self, after checking the values (a :class:`MeshHeadError` names the bad one)."""
        if int(self.tet_resolution) < 4:
            raise MeshHeadError(f"mesh_head.tet_resolution must be >= 4, got {self.tet_resolution}")
        if not self.anchor_weight >= 0:
            raise MeshHeadError(f"mesh_head.anchor_weight must be >= 0, got {self.anchor_weight}")
        if int(self.anchor_points) < 0 or (self.anchor_weight > 0 and int(self.anchor_points) < 2):
            raise MeshHeadError(f"mesh_head.anchor_points must be >= 2 with an anchor, got {self.anchor_points}")
        if not self.anchor_band >= 0:
            raise MeshHeadError(f"mesh_head.anchor_band must be >= 0, got {self.anchor_band}")
        if self.colour_offset is not None and not self.colour_offset >= 0:
            raise MeshHeadError(f"mesh_head.colour_offset must be >= 0 (or null), got {self.colour_offset}")
        self.tet_resolution = int(self.tet_resolution)
        self.anchor_points = int(self.anchor_points)
        self.geometry = bool(self.geometry)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> MeshHeadConfig:
        """From the ``mesh_head`` config section; an unknown key is a one-line :class:`MeshHeadError`."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MeshHeadError(f"unknown mesh_head option(s): {', '.join(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
        kinds = {"tet_resolution": int, "anchor_points": int, "anchor_weight": float, "anchor_band": float,
                 "colour_offset": float, "geometry": bool}
        for key, value in d.items():
            kind = kinds[key]
            if value is None and key == "colour_offset":
                continue
            ok = isinstance(value, bool) if kind is bool else not isinstance(value, bool)
            try:
                converted = kind(value) if ok else None
                ok = ok and (kind is not int or float(value) == converted)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                what = {int: "an integer", float: "a number", bool: "true or false"}[kind]
                raise MeshHeadError(f"mesh_head.{key} must be {what}, got {value!r}")
            d[key] = converted
        return cls(**d).validate()


@dataclass
class SurfaceMesh:
    """One prompt's surface.

    Attributes:
        verts: (V, 3) positions (differentiable w.r.t. the density in geometry mode).
        faces: (F, 3) long, outward oriented.
        normals: (V, 3) unit outward vertex normals (no gradient).
    """

    verts: torch.Tensor
    faces: torch.Tensor
    normals: torch.Tensor

    @property
    def empty(self) -> bool:
        return self.faces.shape[0] == 0


# ---------------------------------------------------------------------------------------------------------------
# Density -> SDF -> mesh
# ---------------------------------------------------------------------------------------------------------------

def density_to_sdf(density: torch.Tensor, threshold: float) -> torch.Tensor:
    """The DMTet signed function of a density: ``threshold - density`` (negative inside; see the module docstring).

    Args:
        density: (...) >= 0.

    Returns:
        (...) same shape.
    """
    return threshold - density


@torch.no_grad()
def grid_sdf(field: torch.nn.Module, cond: dict[str, torch.Tensor], resolution: int, threshold: float,
             bound: float = 1.0) -> torch.Tensor:
    """The signed function on the vertices of ``tet_grid(resolution, bound)`` for B prompts (no gradient).

    Args:
        field: ``field.density(points (B, N, 3), cond) -> (B, N)``.
        cond: conditioning of B prompts.
        resolution: R.
        threshold: the extraction threshold.

    Returns:
        (B, R^3) ``threshold - density``, with the box's boundary vertices set to ``threshold`` (outside).
    """
    from att3d.infer.generate import density_grid

    density = density_grid(field, cond, resolution, bound).reshape(next(iter(cond.values())).shape[0], -1)
    density[:, _boundary_index(resolution, density.device)] = 0.0
    return density_to_sdf(density, threshold)


def _boundary_index(resolution: int, device: torch.device) -> torch.Tensor:
    """(K,) long indices of the vertices of ``tet_grid(resolution)`` on the box's faces."""
    i = torch.arange(resolution, device=device)
    ii, jj, kk = torch.meshgrid(i, i, i, indexing="ij")
    on = (ii == 0) | (ii == resolution - 1) | (jj == 0) | (jj == resolution - 1) | (kk == 0) | (kk == resolution - 1)
    return on.reshape(-1).nonzero().squeeze(1)


def surface_from_sdf(tet_verts: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> SurfaceMesh:
    """Marching tetrahedra of one prompt's signed function, with vertex normals.

    Args:
        tet_verts: (V, 3); tets: (T, 4); sdf: (V,) (differentiable).

    Returns:
        :class:`SurfaceMesh`; its vertices carry the gradient of ``sdf``.
    """
    verts, faces = marching_tetrahedra(tet_verts, tets, sdf)
    normals = vertex_normals(verts.detach(), faces) if faces.shape[0] else torch.zeros_like(verts)
    return SurfaceMesh(verts, faces, normals)


def differentiable_surface(field: torch.nn.Module, cond: dict[str, torch.Tensor], tet_verts: torch.Tensor,
                           tets: torch.Tensor, sdf: torch.Tensor, threshold: float,
                           boundary: torch.Tensor) -> SurfaceMesh:
    """One prompt's surface whose vertices are differentiable w.r.t. the field and its conditioning.

    The density is re-evaluated with gradients only at the vertices of crossed tetrahedra (the only
    ones that position surface vertices); the others keep their values from ``sdf``.

    Args:
        field: the field; cond: conditioning of ONE prompt ``{name: (1, ...)}`` (with gradients).
        tet_verts: (V, 3); tets: (T, 4).
        sdf: (V,) the prompt's signed function without gradient (from :func:`grid_sdf`).
        threshold: the extraction threshold.
        boundary: (V,) bool box-face vertices (kept outside).

    Returns:
        :class:`SurfaceMesh` with vertices differentiable w.r.t. ``field`` parameters and ``cond``.
    """
    with torch.no_grad():
        occ = (sdf < 0)[tets]
        crossed = occ.any(-1) & ~occ.all(-1)
        idx = torch.unique(tets[crossed])
        idx = idx[~boundary[idx]]
    if idx.numel() == 0:
        return surface_from_sdf(tet_verts, tets, sdf)
    density = field.density(tet_verts[idx][None], cond)[0]
    live = sdf.detach().index_put((idx,), density_to_sdf(density, threshold).to(sdf.dtype))
    return surface_from_sdf(tet_verts, tets, live)


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------

def render_surfaces(field: torch.nn.Module, cond: dict[str, torch.Tensor], meshes: list[SurfaceMesh],
                    cameras: OrbitCameras, resolution: int,
                    background: tuple[float, float, float] | torch.Tensor = (1.0, 1.0, 1.0),
                    colour_offset: float = 0.0) -> dict[str, torch.Tensor]:
    """Render B prompts' meshes, each from its own camera, coloured by the (amortized) colour field.

    Each pixel's colour is ``field(p - colour_offset * n, cond_b)``'s rgb at the visible surface point
    ``p`` (interpolated with the rasterizer's perspective-correct barycentrics) and its interpolated unit
    normal ``n``; no shading is added. All visible points of the batch go through the field in one call.

    Args:
        field: ``field(points (B, N, 3), cond) -> (density (B, N), rgb (B, N, 3))``.
        cond: conditioning of the B prompts.
        meshes: B surfaces (empty ones render as background).
        cameras: B cameras.
        resolution: H = W.
        background: (3,) or (B, 3) colour behind the meshes.
        colour_offset: distance inside the surface at which the colour is read.

    Returns:
        ``rgb`` (B, H, W, 3) differentiable w.r.t. the field, ``cond`` and the mesh vertices;
        ``mask`` (B, H, W) float foreground; ``points`` (B,) long visible surface points per image.
    """
    B = len(meshes)
    if len(cameras) != B:
        raise ValueError(f"{len(cameras)} cameras for {B} meshes")
    some = next(iter(cond.values()))
    device, dtype = some.device, torch.float32
    H = W = int(resolution)
    rows_b, rows_r, rows_c, points = [], [], [], []
    for b, mesh in enumerate(meshes):
        if mesh.empty:
            points.append(torch.zeros(0, 3, device=device, dtype=dtype))
            continue
        rast = rasterize(mesh.verts, mesh.faces, H, cameras.index([b]))
        fg = rast.mask[0]
        r, c = fg.nonzero(as_tuple=True)
        p = interpolate(mesh.verts, rast, mesh.faces)[0][r, c]  # (P, 3)
        if colour_offset > 0 and r.numel():
            n = F.normalize(interpolate(mesh.normals, rast, mesh.faces)[0][r, c].detach(), dim=-1)
            p = p - colour_offset * n
        points.append(p.to(dtype))
        rows_b.append(torch.full_like(r, b))
        rows_r.append(r)
        rows_c.append(c)
    counts = torch.tensor([p.shape[0] for p in points])
    bg = torch.as_tensor(background, dtype=dtype, device=device).reshape(-1, 3).expand(B, 3)
    image = bg[:, None, None, :].expand(B, H, W, 3)
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=device)
    n_max = int(counts.max()) if B else 0
    if n_max > 0:
        padded = torch.stack([F.pad(p, (0, 0, 0, n_max - p.shape[0])) for p in points])  # (B, n_max, 3)
        _, rgb = field(padded, cond)
        keep = torch.arange(n_max)[None, :] < counts[:, None]  # (B, n_max)
        colours = rgb[keep.to(device)].to(dtype)  # (P_total, 3), in (b, pixel) order
        bi, ri, ci = torch.cat(rows_b), torch.cat(rows_r), torch.cat(rows_c)
        mask[bi, ri, ci] = True
        surface = torch.zeros(B, H, W, 3, dtype=dtype, device=device).index_put((bi, ri, ci), colours)
        image = torch.where(mask[..., None], surface, image)
    return {"rgb": image, "mask": mask.to(dtype), "points": counts}


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------

class MeshHeadTrainer(Trainer):
    """Amortized SDS refinement of a model through its meshes (see the module docstring).

    Args:
        model: the trained amortized model to refine (a copy of it, made here, is the frozen reference for the
            texture-mode geometry and the anchor).
        prompts: the prompt bank.
        guidance: a :class:`~att3d.guidance.sds.ScoreDistillation`.
        cfg: the trainer settings (``resolution``: the mesh render size; ``batch_size``: prompts per step).
        head: the mesh head settings.
        run_dir: checkpoints, ``metrics.jsonl``, TensorBoard events and the final ``model/`` folder.
        background: (3,) colour behind the meshes.
        embedding_cache: folder to keep the prompts' text embeddings in.
        progress: progress bars.
        source: where the starting model came from (recorded in the output folder's ``extra``).
        source_extra: the starting folder's own ``extra`` (kept under ``extra["previous"]``).
    """

    def __init__(self, model: AmortizedModel, prompts: PromptBank, guidance: Any, cfg: TrainerConfig,
                 head: MeshHeadConfig, run_dir: str | Path, background: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 embedding_cache: str | Path | None = None, progress: bool = True, source: str | None = None,
                 source_extra: dict[str, Any] | None = None):
        from att3d.infer.generate import extraction_threshold
        from att3d.train.refine import copy_model

        if cfg.interpolation.prob > 0:
            raise MeshHeadError("the mesh head does not mix prompts (a mixture has no mesh of its own here): "
                                "set trainer.interpolation.prob=0")
        if cfg.resolution < 8:
            raise MeshHeadError(f"the mesh render resolution must be >= 8, got {cfg.resolution}")
        self.head = head.validate()
        super().__init__(model, prompts, guidance, cfg, run_dir, background=background,
                         embedding_cache=embedding_cache, progress=progress)
        if self.dist.enabled:
            raise MeshHeadError("the mesh head runs in one process (no torchrun)")
        self.source = source
        self.source_extra = source_extra
        self.threshold = extraction_threshold(self.model)
        self.bound = float(getattr(self.model.field, "bound", 1.0))
        self.reference = copy_model(self.model).eval().requires_grad_(False)
        R = head.tet_resolution
        self.tet_verts, self.tets = tet_grid(R, self.bound, device=self.device)
        self.boundary = torch.zeros(self.tet_verts.shape[0], dtype=torch.bool, device=self.device)
        self.boundary[_boundary_index(R, self.device)] = True
        self.cell = 2.0 * self.bound / (R - 1)
        self.colour_offset = (2.0 * self.bound / (GENERATE_GRID_RESOLUTION - 1) if head.colour_offset is None
                              else float(head.colour_offset))
        self.reference_meshes = self._extract_reference()

    # -- geometry ------------------------------------------------------------------------------------------------
    def _extract_reference(self, batch: int = 8) -> list[SurfaceMesh]:
        """The starting model's mesh of every prompt (fixed: the starting model is not trained)."""
        from tqdm import tqdm

        meshes: list[SurfaceMesh] = []
        n = len(self.prompts)
        for s in tqdm(range(0, n, batch), desc="meshes", disable=not self.progress, leave=False):
            idx = torch.arange(s, min(n, s + batch), device=self.device)
            with torch.no_grad():
                cond = self.reference.mapping(self.text_emb.index(idx))
                sdf = grid_sdf(self.reference.field, cond, self.head.tet_resolution, self.threshold, self.bound)
                meshes += [surface_from_sdf(self.tet_verts, self.tets, s_b) for s_b in sdf]
        empty = [p for p, m in zip(self.prompts.prompts, meshes) if m.empty]
        if len(empty) == n:
            raise MeshHeadError(f"no prompt has a surface: the starting model's density never exceeds the extraction "
                                f"threshold {self.threshold:g} on the {self.head.tet_resolution}^3 tet grid; "
                                "start from a trained model")
        if empty:
            log.warning("%d of %d prompts have no surface at threshold %g (e.g. %r): nothing of them to texture",
                        len(empty), n, self.threshold, empty[0])
        return meshes

    def meshes(self, idx: torch.Tensor, cond: dict[str, torch.Tensor]) -> list[SurfaceMesh]:
        """The batch's meshes: the starting ones (texture mode) or differentiable ones of the current density.

        Args:
            idx: (B,) prompt indices; cond: their conditioning (B, ...) with gradients.
        """
        if not self.head.geometry:
            return [self.reference_meshes[int(i)] for i in idx]
        sdf = grid_sdf(self.model.field, {k: v.detach() for k, v in cond.items()}, self.head.tet_resolution,
                       self.threshold, self.bound)
        return [differentiable_surface(self.model.field, {k: v[b:b + 1] for k, v in cond.items()}, self.tet_verts,
                                       self.tets, sdf[b], self.threshold, self.boundary) for b in range(len(idx))]

    def anchor_points(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) anchor points: half near each prompt's starting surface (jittered along its normals by
        ``anchor_band`` cells), half uniform in the box; drawn from the trainer's generator."""
        n = self.head.anchor_points
        n_near = n // 2
        out = []
        for i in idx:
            mesh = self.reference_meshes[int(i)]
            uniform = (torch.rand(n, 3, generator=self.generator) * 2.0 - 1.0) * self.bound
            pick = torch.randint(0, max(1, mesh.verts.shape[0]), (n_near,), generator=self.generator)
            jitter = torch.randn(n_near, 1, generator=self.generator) * (self.head.anchor_band * self.cell)
            if not mesh.empty:
                near = mesh.verts.detach().cpu()[pick] + jitter * mesh.normals.cpu()[pick]
                uniform = torch.cat([near, uniform[n_near:]])
            out.append(uniform)
        return torch.stack(out).to(self.device)

    def anchor_loss(self, idx: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``mean((log1p d - log1p d0)^2)`` of the current and the starting density at :meth:`anchor_points`."""
        pts = self.anchor_points(idx)
        with torch.no_grad():
            ref_cond = self.reference.mapping(self.text_emb.index(idx.to(self.device)))
            d0 = self.reference.field.density(pts, ref_cond)
        d = self.model.field.density(pts, cond)
        return (torch.log1p(d.float()) - torch.log1p(d0.float())).square().mean()

    # -- one step ------------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One step over a batch of prompts (each with its own camera); returns its statistics.

        A skipped step (non-finite loss or gradient) returns ``{"skipped": 1.0}``.
        """
        cfg = self.cfg
        batch = self.sample_batch()
        idx = batch["idx"]
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        cond = self.model.mapping(batch["emb"])
        meshes = self.meshes(idx, cond)
        out = render_surfaces(self.model.field, cond, meshes, batch["cameras"], cfg.resolution,
                              background=self.background, colour_offset=self.colour_offset)
        images = out["rgb"].permute(0, 3, 1, 2)  # (B, 3, H, W); the prior resizes it to its resolution
        anchor = torch.zeros((), device=self.device)
        if self.head.anchor_weight > 0:
            anchor = self.anchor_loss(idx, cond)
        t, noise = self._sds_random()
        sds = self.guidance(images, batch["cond"], batch["cameras"], step=self.step, generator=self.generator,
                            t=t, noise=noise)
        loss = sds.loss + self.head.anchor_weight * anchor
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(loss)):
            return self._bad_step("loss")
        if sds.num_nonfinite >= len(idx):
            return self._bad_step("SDS gradient (every item of the batch)")
        grad_norm = torch.zeros(())
        if loss.requires_grad:  # False only when no mesh of the batch is visible and there is no anchor
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            if not bool(torch.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                return self._bad_step("gradient")
            self.optimizer.step()
        self.step += 1
        return {"loss": float(sds.loss.detach()), "total_loss": float(loss.detach()), "anchor": float(anchor.detach()),
                "grad_norm": float(grad_norm), "sds_grad_norm": float(sds.grad_norm),
                "opacity": float(out["mask"].mean()), "faces": float(sum(m.faces.shape[0] for m in meshes)) / len(idx),
                "empty": float(sum(m.empty for m in meshes)), "t_mean": float(sds.t.float().mean()),
                "sds_nonfinite": float(sds.num_nonfinite), "lr": self.lr_at(self.step - 1),
                "_images": images.detach()}

    # -- output --------------------------------------------------------------------------------------------------
    def stage_record(self) -> dict[str, Any]:
        """What the output folder's ``extra`` records about this stage."""
        record: dict[str, Any] = {
            "stage": STAGE, "steps": self.step, "prompts": len(self.prompts), "init_from": self.source,
            "render_resolution": self.cfg.resolution, "prior_resolution": int(self.guidance.prior.resolution),
            "threshold": self.threshold, "mesh_head": asdict(self.head)}
        if self.source_extra:
            record["previous"] = self.source_extra
        return record

    def fit(self, resume: bool = True) -> Path:
        """Train to ``max_steps`` (resuming from the run folder's latest checkpoint); returns ``run_dir/model``,
        a plain model folder whose ``extra`` records the stage (:meth:`stage_record`)."""
        final = super().fit(resume)
        self.model.save_pretrained(final, extra=self.stage_record())
        return final


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def experiment_defaults() -> dict[str, Any]:
    """``{"trainer": ..., "mesh_head": ..., "prompts": ..., "guidance": ...}``: ``configs/trainer/default.yaml``
    with ``configs/experiment/mesh_head.yaml`` on top (the latter may be missing: built-in defaults)."""
    from omegaconf import OmegaConf

    from att3d.train.app import configs_dir

    root = configs_dir()
    trainer = OmegaConf.load(root / "trainer" / "default.yaml")
    exp_path = root / "experiment" / "mesh_head.yaml"
    exp = OmegaConf.load(exp_path) if exp_path.is_file() else OmegaConf.create({})
    merged = OmegaConf.merge({"trainer": trainer, "mesh_head": {}, "prompts": {"train": "shapes64_train"},
                              "guidance": {"name": "shapes", "guidance_scale": None}}, exp)
    return OmegaConf.to_container(merged, resolve=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m att3d.train.mesh_head",
        description="LATTE3D's second stage: refine a trained amortized model through textured meshes (DMTet "
                    "extraction, differentiable rasterization at a higher resolution, SDS from the same prior), "
                    "amortized over a prompt set. Defaults come from configs/experiment/mesh_head.yaml; the "
                    "result is OUT/model, a model folder for att3d generate. Running again with the same --out "
                    "resumes.")
    ap.add_argument("--init-from", required=True, help="the trained amortized model folder to start from")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, metrics, the final model/)")
    ap.add_argument("--prompts", default=None,
                    help="built-in prompt set (e.g. shapes64_train) or a prompt file, one prompt a line")
    ap.add_argument("--steps", type=int, default=None, help="optimisation steps (trainer.max_steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="prompts per step, each with its own camera")
    ap.add_argument("--resolution", type=int, default=None, help="mesh render resolution (the prior resizes it)")
    ap.add_argument("--tet-resolution", type=int, default=None, help="DMTet grid vertices per axis")
    geo = ap.add_mutually_exclusive_group()
    geo.add_argument("--geometry", dest="geometry", action="store_true", default=None,
                     help="also refine the geometry through the mesh")
    geo.add_argument("--texture-only", dest="geometry", action="store_false", help="keep the starting geometry")
    ap.add_argument("--anchor-weight", type=float, default=None, help="weight of the density anchor (0: off)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate")
    ap.add_argument("--guidance", default=None, help="guidance config name (configs/guidance/) or YAML file")
    ap.add_argument("--prior", default=None, help="prior folder (overrides the guidance config's prior.path)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    ap.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None, help="auto, cpu or cuda[:N]")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--embedding-cache", default=None, help="folder to keep prompt embeddings in")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting as a dotted override, e.g. trainer.warmup_steps=20 or "
                         "mesh_head.anchor_points=4096 (repeatable)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings: experiment defaults, then ``--set`` overrides, then the named options."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(experiment_defaults())
    for item in args.overrides:
        if "=" not in item:
            raise MeshHeadError(f"--set expects KEY=VALUE, got {item!r}")
        key = item.split("=", 1)[0].strip()
        if key.split(".")[0] not in ("trainer", "mesh_head", "prompts", "guidance"):
            raise MeshHeadError(f"--set {item!r}: the key must start with trainer., mesh_head., prompts. or guidance.")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except Exception as e:  # an OmegaConf grammar error
            raise MeshHeadError(f"--set {item!r}: {' '.join(str(e).split())}") from None
    out = OmegaConf.to_container(cfg, resolve=True)
    named = {
        ("trainer", "max_steps"): args.steps, ("trainer", "batch_size"): args.batch_size,
        ("trainer", "resolution"): args.resolution, ("trainer", "lr"): args.lr,
        ("trainer", "checkpoint_every"): args.checkpoint_every, ("trainer", "seed"): args.seed,
        ("trainer", "device"): args.device, ("trainer", "threads"): args.threads,
        ("mesh_head", "tet_resolution"): args.tet_resolution, ("mesh_head", "geometry"): args.geometry,
        ("mesh_head", "anchor_weight"): args.anchor_weight, ("prompts", "train"): args.prompts,
        ("guidance", "name"): args.guidance, ("guidance", "guidance_scale"): args.guidance_scale,
    }
    for (section, key), value in named.items():
        if value is not None:
            out.setdefault(section, {})[key] = value
    if args.prior is not None:
        out["guidance"]["prior"] = args.prior
    return out


def build(settings: dict[str, Any], init_from: str | Path, run_dir: str | Path,
          embedding_cache: str | Path | None = None, progress: bool = True) -> MeshHeadTrainer:
    """The trainer of resolved settings (see :func:`resolve_settings`); errors are one-line :class:`Att3dError`."""
    from att3d.model import CONFIG_NAME
    from att3d.text.prompts import resolve_prompts
    from att3d.train.app import configs_dir, resolve_path
    from att3d.train.refine import guidance_config
    from att3d.train.trainer import pick_device, trainer_config_from_dict
    from att3d.utils.checkpoint import load_json

    tcfg = trainer_config_from_dict(settings["trainer"])
    head = MeshHeadConfig.from_dict(settings.get("mesh_head"))
    if tcfg.max_steps < 0:
        raise MeshHeadError(f"--steps must be >= 0, got {tcfg.max_steps}")
    if tcfg.batch_size < 1:
        raise MeshHeadError(f"--batch-size must be >= 1, got {tcfg.batch_size}")
    if tcfg.resolution < 8:
        raise MeshHeadError(f"the mesh render resolution must be >= 8, got {tcfg.resolution}")
    if tcfg.interpolation.prob > 0:
        raise MeshHeadError("the mesh head does not mix prompts (a mixture has no mesh of its own here): "
                            "set trainer.interpolation.prob=0")
    # Everything that can be checked without loading anything first.
    prompts = PromptBank(resolve_prompts(settings["prompts"]["train"], base_dir=configs_dir() / "prompts"))
    folder = resolve_path(init_from)
    if not folder.is_dir():
        raise MeshHeadError(f"--init-from: no model folder at {init_from}")
    gset = dict(settings.get("guidance") or {})
    gcfg = guidance_config(str(gset.get("name") or "shapes"), gset.get("prior"))
    if gset.get("guidance_scale") is not None:
        gcfg["guidance_scale"] = float(gset["guidance_scale"])
    prior_path = gcfg["prior"].get("path")
    if gcfg["prior"].get("name") == "shapes" and prior_path and not resolve_path(prior_path).exists():
        raise MeshHeadError(f"no shapes prior at {prior_path} (train one with scripts/train_prior.py or pass --prior)")
    background = tuple(gcfg.get("background") or (1.0, 1.0, 1.0))
    device = pick_device(tcfg.device)
    model = AmortizedModel.from_pretrained(folder, device=device)
    source_extra = load_json(folder / CONFIG_NAME).get("extra")
    from att3d.train.app import build_guidance

    try:
        guidance = build_guidance(gcfg, str(device))
        return MeshHeadTrainer(model, prompts, guidance, tcfg, head, run_dir, background=background,
                               embedding_cache=embedding_cache, progress=progress, source=str(folder),
                               source_extra=source_extra)
    except (ValueError, TypeError) as e:  # a component rejected its options
        raise MeshHeadError(f"invalid configuration: {' '.join(str(e).split())}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m att3d.train.mesh_head --init-from MODEL --out DIR ...``; returns the exit code.

    0: done (``DIR/model`` written); 2: a user error, printed as one line; 130 / 143: stopped by
    SIGINT / SIGTERM after a checkpoint (the same command resumes).
    """
    from att3d.train.app import resolve_path
    from att3d.utils.checkpoint import save_json

    args = _parser().parse_args(argv)
    try:
        settings = resolve_settings(args)
        run_dir = Path(args.out)
        cache = resolve_path(args.embedding_cache) if args.embedding_cache else None
        trainer = build(settings, args.init_from, run_dir, embedding_cache=cache, progress=not args.no_progress)
        latest = trainer.restore(resume=True)
        record = {"init_from": str(trainer.source), "settings": settings}
        previous = run_dir / "mesh_head.json"
        if latest is not None and previous.is_file():
            from att3d.utils.checkpoint import load_json

            before = load_json(previous).get("init_from")
            if before != record["init_from"]:
                log.warning("resuming %s, which started from %s, with --init-from %s (the reference geometry and "
                            "anchor now come from the latter)", run_dir, before, record["init_from"])
        save_json(previous, record)
        start = trainer.step
        folder = trainer.fit(resume=True)
    except Att3dError as e:
        code = getattr(e, "exit_code", None)  # att3d.train.trainer.TrainingInterrupted
        print(f"att3d: {'' if code else 'error: '}{' '.join(str(e).split())}", file=sys.stderr)
        return int(code) if code else 2
    except FileNotFoundError as e:
        print(f"att3d: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    rate = [h.get("steps_per_s") for h in trainer.history if h.get("steps_per_s")]
    speed = f", {1.0 / rate[-1]:.2f} s/step" if rate and math.isfinite(rate[-1]) and rate[-1] > 0 else ""
    print(f"mesh head: {trainer.step - start} steps (to step {trainer.step}){speed}; model written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
