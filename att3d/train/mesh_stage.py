"""LATTE3D's second stage: a textured-mesh stage refined with score distillation, amortized over a prompt set.

``att3d train stage=mesh init_from=MODEL`` starts from a trained amortized NeRF model folder; every prompt gets a
surface mesh from a DMTet tetrahedral grid (:mod:`att3d.mesh.surface`), and the model is refined so that the
*meshes* it produces (not its volume renders) look right to the same diffusion prior::

    text --> mapping --> field conditioning cond_b                                  (per prompt, amortized)
    tet grid (R^3 vertices) --> sdf = threshold - density(vertex, cond_b)           (DMTet initialisation)
    marching_tetrahedra(sdf) --> mesh (V, 3), (F, 3)                               (differentiable)
    rasterize(mesh, camera_b) at H (e.g. 64) --> surface point per pixel            (pure-torch rasterizer)
    pixel colour = field rgb at the surface point (moved ``colour_offset`` inside), no extra shading
                   (the colour field already holds the world's fixed lighting), composited on the background
    SDS(prior at its resolution, e.g. 32)                                           (the render is downsampled)

**What is trained.** Only the model's own parameters (the mapping network and the shared field), so the result
is a plain model folder that ``att3d.load`` / ``att3d generate`` read (the stage is recorded in the folder's
``extra``). Two modes:

* texture (default): the geometry is that of the starting model (its meshes are extracted once per prompt and
  kept fixed); the SDS gradient reaches the colour field through the rasterizer's interpolated surface points.
  Since density and colour share the grids and the MLP, an *anchor* loss keeps the density where it was:
  ``anchor_weight * mean((log1p d - log1p d0)^2)`` over ``anchor_points`` points per prompt per step (half near
  the starting surface, half uniform in the box; ``d0`` the starting model's density), so that generation still
  extracts the same shapes.
* geometry (``stage.geometry=true``): the mesh is re-extracted every step from the current density, and the SDS
  gradient also reaches the density through the mesh vertices (marching tetrahedra is differentiable in ``sdf``; the
  rasterizer's barycentrics in the vertex positions, and its antialiased occlusion edges,
  :func:`att3d.mesh.rasterize.antialias`, in where the silhouettes are: ``stage.antialias``, on by default). DMTet's
  per-vertex deformations are *not* used: a plain model folder has nowhere to keep them and generation would ignore
  them. The anchor (if its weight is > 0) then acts as a regulariser towards the start.

**Resolution.** The mesh is rendered at ``trainer.resolution`` (64 in ``configs/stage/mesh.yaml``, twice the
NeRF stage's 32); the prior's ``encode_images`` resizes every render to the prior's own resolution with
antialiased bilinear filtering, inside the SDS loss, so the downsampling is differentiable
(``stage.downsample=area``: the stage averages each block of render pixels itself). ``stage.aliased_share`` shows
the prior the aliased render (as the shapes world's renders are) while the gradients stay the antialiased one's.

The loop, checkpoints, exact resume, signals, non-finite skipping, ``metrics.jsonl`` and TensorBoard are the
:class:`~att3d.train.trainer.Trainer`'s. One process only (no ``torchrun``) and no interpolation mixing (a
mixture has no mesh of its own here). ``trainer.opacity_reg``, ``trainer.entropy_reg`` and
``trainer.mixed_precision`` do not apply.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from att3d.mesh.extract import extraction_threshold
from att3d.mesh.marching_tets import crossed_cell_tets, grid_vertices
from att3d.mesh.surface import (
    SHADINGS,
    SurfaceMesh,
    boundary_index,
    differentiable_surface,
    grid_sdf,
    render_surfaces,
    surface_from_sdf,
)
from att3d.model import copy_model
from att3d.train.objectives import STAGES, Objective, StepResult
from att3d.utils.errors import Att3dError

if TYPE_CHECKING:  # pragma: no cover
    from att3d.train.batch import Batch
    from att3d.train.trainer import Trainer

log = logging.getLogger(__name__)

#: How a render reaches the prior's resolution (:class:`MeshSDS`'s ``downsample``).
DOWNSAMPLES = ("prior", "area")

#: The grid resolution of generation by default (its colour is read one cell of it inside the surface).
GENERATE_GRID_RESOLUTION = 128


class MeshStageError(Att3dError):
    """The mesh stage cannot run as asked (bad option, no surface to texture)."""


@STAGES.register("mesh")
class MeshSDS(Objective):
    """Amortized SDS refinement of a model through its meshes (see the module docstring).

    Args:
        tet_resolution: vertices per axis of the DMTet grid over the field's box (``6 (R-1)^3`` tetrahedra).
        geometry: also refine the geometry (the density) through the mesh; False: texture only.
        anchor_weight: weight of the density anchor (keeps the starting model's density; 0: off).
        anchor_points: points per prompt and step of the anchor.
        anchor_band: std of the near-surface anchor points' offsets along the normal, in tet grid cells.
        colour_offset: how far inside the surface (world units, along the inward normal) the colour is read;
            None: one cell of generation's 128^3 grid (``2 bound / 127``), where generation reads the colour it
            bakes into the texture.
        min_resolution: the smallest mesh render size accepted.
        coarse_step: the tet grid's density is evaluated coarse to fine (:func:`~att3d.mesh.surface.grid_sdf`): on every
            ``coarse_step``-th vertex first, then only near the surface (exact there; 1: at every vertex).
        shading: ``"none"``: a pixel is the colour field's value (radiance, as the NeRF stage learnt it);
            ``"lambert"``: the colour field becomes an albedo lit by the world's light with the mesh's
            differentiable normals (:func:`att3d.mesh.surface.render_surfaces`), so the prior's view of the
            shading moves the geometry too; generation then bakes the albedo as the PBR base colour.
        downsample: how a render larger than the prior's images reaches the prior's resolution: ``"prior"``, the
            prior's own resize (antialiased bilinear: a tent filter two render pixels wide per prior pixel);
            ``"area"``, the mean of each block of render pixels (supersampling: each prior pixel is the
            surface's coverage of it, as sharp as the prior's aliased training renders; the render size must be a
            multiple of the prior's).
        aliased_share: with ``antialias``, the share of the aliased render (each pixel the surface at its centre,
            as in the shapes world's renders that its prior learnt from) in the values the prior sees, in [0, 1];
            the gradients stay the antialiased render's (straight through;
            :func:`~att3d.mesh.surface.render_surfaces`). 0: the antialiased render.
    """

    name = "mesh"
    distributed = False
    mixing = False

    def __init__(self, tet_resolution: int = 64, geometry: bool = False, anchor_weight: float = 1.0,
                 anchor_points: int = 2048, anchor_band: float = 2.0, colour_offset: float | None = None,
                 min_resolution: int = 8, shading: str = "none", antialias: bool = True, coarse_step: int = 4,
                 downsample: str = "prior", aliased_share: float = 0.0):
        if not isinstance(tet_resolution, int) or isinstance(tet_resolution, bool) or tet_resolution < 4:
            raise MeshStageError(f"stage.tet_resolution must be an integer >= 4, got {tet_resolution!r}")
        if not isinstance(geometry, bool):
            raise MeshStageError(f"stage.geometry must be true or false, got {geometry!r}")
        if not (isinstance(anchor_weight, (int, float)) and anchor_weight >= 0):
            raise MeshStageError(f"stage.anchor_weight must be >= 0, got {anchor_weight!r}")
        if not isinstance(anchor_points, int) or isinstance(anchor_points, bool) or anchor_points < 0 \
                or (anchor_weight > 0 and anchor_points < 2):
            raise MeshStageError(f"stage.anchor_points must be an integer >= 2 with an anchor, got {anchor_points!r}")
        if not (isinstance(anchor_band, (int, float)) and anchor_band >= 0):
            raise MeshStageError(f"stage.anchor_band must be >= 0, got {anchor_band!r}")
        if colour_offset is not None and not (isinstance(colour_offset, (int, float)) and colour_offset >= 0):
            raise MeshStageError(f"stage.colour_offset must be >= 0 (or null), got {colour_offset!r}")
        if not isinstance(coarse_step, int) or isinstance(coarse_step, bool) or coarse_step < 1:
            raise MeshStageError(f"stage.coarse_step must be an integer >= 1, got {coarse_step!r}")
        if not isinstance(antialias, bool):
            raise MeshStageError(f"stage.antialias must be true or false, got {antialias!r}")
        if shading not in SHADINGS:
            raise MeshStageError(f"stage.shading must be one of {', '.join(SHADINGS)}, got {shading!r}")
        if isinstance(aliased_share, bool) or not isinstance(aliased_share, (int, float)) \
                or not 0.0 <= aliased_share <= 1.0:
            raise MeshStageError(f"stage.aliased_share must be a number in [0, 1], got {aliased_share!r}")
        if downsample not in DOWNSAMPLES:
            raise MeshStageError(f"stage.downsample must be one of {', '.join(DOWNSAMPLES)}, got {downsample!r}")
        self.shading = shading
        self.antialias = antialias
        self.downsample = downsample
        self.aliased_share = float(aliased_share)
        self.coarse_step = int(coarse_step)
        self.tet_resolution = int(tet_resolution)
        self.geometry = geometry
        self.anchor_weight = float(anchor_weight)
        self.anchor_points = int(anchor_points)
        self.anchor_band = float(anchor_band)
        self.colour_offset = None if colour_offset is None else float(colour_offset)
        self.min_resolution = int(min_resolution)
        self.source: str | None = None
        self.source_extra: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        """The stage's arguments (recorded in the output folder)."""
        return {"tet_resolution": self.tet_resolution, "geometry": self.geometry, "anchor_weight": self.anchor_weight,
                "anchor_points": self.anchor_points, "anchor_band": self.anchor_band,
                "colour_offset": self.colour_offset, "shading": self.shading, "antialias": self.antialias,
                "coarse_step": self.coarse_step, "downsample": self.downsample,
                "aliased_share": self.aliased_share}

    # -- set-up --------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        if trainer.cfg.resolution < self.min_resolution:
            raise MeshStageError(f"the mesh render resolution must be >= {self.min_resolution}, got "
                                 f"{trainer.cfg.resolution}")
        prior_res = int(trainer.guidance.prior.resolution)
        if self.downsample == "area" and trainer.cfg.resolution % prior_res:
            raise MeshStageError(f"stage.downsample=area needs a render size that is a multiple of the prior's "
                                 f"{prior_res} px, got trainer.resolution={trainer.cfg.resolution}")
        self.trainer = trainer
        model, device = trainer.model, trainer.device
        self.threshold = extraction_threshold(model)
        self.bound = float(getattr(model.field, "bound", 1.0))
        self.reference = copy_model(model).eval().requires_grad_(False)
        R = self.tet_resolution
        self.tet_verts = grid_vertices(R, self.bound, device=device)  # tets: per prompt, in crossed cubes only
        self.boundary = torch.zeros(self.tet_verts.shape[0], dtype=torch.bool, device=device)
        self.boundary[boundary_index(R, device)] = True
        self.cell = 2.0 * self.bound / (R - 1)
        self.offset = (2.0 * self.bound / (GENERATE_GRID_RESOLUTION - 1) if self.colour_offset is None
                       else self.colour_offset)
        self.reference_meshes = self._extract_reference(trainer)

    def _extract_reference(self, trainer: Trainer, batch: int = 8) -> list[SurfaceMesh]:
        """The starting model's mesh of every prompt (fixed: the starting model is not trained)."""
        from tqdm import tqdm

        meshes: list[SurfaceMesh] = []
        n = len(trainer.prompts)
        for s in tqdm(range(0, n, batch), desc="meshes", disable=not trainer.progress, leave=False):
            idx = torch.arange(s, min(n, s + batch), device=trainer.device)
            with torch.no_grad():
                cond = self.reference.mapping(trainer.text_emb.index(idx))
                sdf = grid_sdf(self.reference.field, cond, self.tet_resolution, self.threshold, self.bound,
                               self.coarse_step)
                meshes += [surface_from_sdf(self.tet_verts, self.crossed_tets(s_b), s_b) for s_b in sdf]
        empty = [p for p, m in zip(trainer.prompts.prompts, meshes) if m.empty]
        if len(empty) == n:
            raise MeshStageError(f"no prompt has a surface: the starting model's density never exceeds the "
                                 f"extraction threshold {self.threshold:g} on the {self.tet_resolution}^3 tet grid; "
                                 "start from a trained model (init_from=...)")
        if empty:
            log.warning("%d of %d prompts have no surface at threshold %g (e.g. %r): nothing of them to texture",
                        len(empty), n, self.threshold, empty[0])
        return meshes

    # -- geometry ------------------------------------------------------------------------------------------------
    def meshes(self, idx: torch.Tensor, cond: dict[str, torch.Tensor]) -> list[SurfaceMesh]:
        """The batch's meshes: the starting ones (texture mode) or differentiable ones of the current density.

        Args:
            idx: (B,) prompt indices; cond: their conditioning (B, ...) with gradients.
        """
        if not self.geometry:
            return [self.reference_meshes[int(i)] for i in idx]
        field = self.trainer.model.field
        sdf = grid_sdf(field, {k: v.detach() for k, v in cond.items()}, self.tet_resolution, self.threshold,
                       self.bound, self.coarse_step)
        return [differentiable_surface(field, {k: v[b:b + 1] for k, v in cond.items()}, self.tet_verts,
                                       self.crossed_tets(sdf[b]), sdf[b], self.threshold, self.boundary)
                for b in range(len(idx))]

    def crossed_tets(self, sdf: torch.Tensor) -> torch.Tensor:
        """(T', 4) the tet grid's tetrahedra in the cubes that ``sdf`` (R^3,) changes sign in: all that marching
        tetrahedra needs (:func:`~att3d.mesh.marching_tets.crossed_cell_tets`; the same surface as the whole grid's)."""
        R = self.tet_resolution
        return crossed_cell_tets((sdf < 0).reshape(R, R, R))

    def anchor_points_of(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) anchor points: half near each prompt's starting surface (jittered along its normals by
        ``anchor_band`` cells), half uniform in the box; drawn from the trainer's generator."""
        gen = self.trainer.generator
        n = self.anchor_points
        n_near = n // 2
        out = []
        for i in idx:
            mesh = self.reference_meshes[int(i)]
            uniform = (torch.rand(n, 3, generator=gen) * 2.0 - 1.0) * self.bound
            pick = torch.randint(0, max(1, mesh.verts.shape[0]), (n_near,), generator=gen)
            jitter = torch.randn(n_near, 1, generator=gen) * (self.anchor_band * self.cell)
            if not mesh.empty:
                near = mesh.verts.detach().cpu()[pick] + jitter * mesh.normals.cpu()[pick]
                uniform = torch.cat([near, uniform[n_near:]])
            out.append(uniform)
        return torch.stack(out).to(self.trainer.device)

    def anchor_loss(self, idx: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """``mean((log1p d - log1p d0)^2)`` of the current and the starting density at :meth:`anchor_points_of`."""
        trainer = self.trainer
        pts = self.anchor_points_of(idx)
        with torch.no_grad():
            ref_cond = self.reference.mapping(trainer.text_emb.index(idx.to(trainer.device)))
            d0 = self.reference.field.density(pts, ref_cond)
        d = trainer.model.field.density(pts, cond)
        return (torch.log1p(d.float()) - torch.log1p(d0.float())).square().mean()

    # -- one step ------------------------------------------------------------------------------------------------
    def render_batch(self, trainer: Trainer, batch: Batch) -> dict[str, Any]:
        """The batch's meshes rendered from its cameras: ``idx`` (N,) prompt of each row, ``cond`` (with gradients),
        ``meshes``, ``images`` (N, 3, H, W), ``mask`` (N, H, W), ``anchor`` (the anchor loss, 0 without) and the
        step's ``stats``."""
        views = batch.views
        idx = batch.idx.repeat_interleave(views) if views > 1 else batch.idx
        cond = trainer.model.mapping(batch.emb)
        meshes = self.meshes(idx, cond)
        out = render_surfaces(trainer.model.field, cond, meshes, batch.cameras, trainer.cfg.resolution,
                              background=trainer.background, colour_offset=self.offset, shading=self.shading,
                              antialias=self.antialias, aliased_share=self.aliased_share)
        anchor = torch.zeros((), device=trainer.device)
        if self.anchor_weight > 0:
            anchor = self.anchor_loss(idx, cond)
        stats = {"anchor": anchor.detach(), "opacity": out["mask"].mean(),
                 "faces": float(sum(m.faces.shape[0] for m in meshes)) / len(idx),
                 "empty": float(sum(m.empty for m in meshes))}
        images = out["rgb"].permute(0, 3, 1, 2)
        prior_res = int(trainer.guidance.prior.resolution)
        if self.downsample == "area" and images.shape[-1] != prior_res:
            images = torch.nn.functional.avg_pool2d(images, images.shape[-1] // prior_res)
        return {"idx": idx, "cond": cond, "meshes": meshes, "images": images, "mask": out["mask"], "anchor": anchor,
                "stats": stats}

    def step(self, trainer: Trainer, batch: Batch) -> StepResult:
        r = self.render_batch(trainer, batch)  # images (B, 3, H, W); the prior resizes them to its resolution
        sds = trainer.score_distillation(r["images"], batch)
        return StepResult(sds.loss + self.anchor_weight * r["anchor"], sds, r["stats"], r["images"])

    def record(self, trainer: Trainer) -> dict[str, Any]:
        """The base record (stage, steps, prompts, ``init_from``, the ``teacher``, the ``previous`` stages) and the
        stage's own: render and prior resolutions, the extraction threshold and its settings (``mesh``)."""
        record = super().record(trainer)
        record.update({"init_from": self.source, "render_resolution": trainer.cfg.resolution,
                       "prior_resolution": int(trainer.guidance.prior.resolution), "threshold": self.threshold,
                       "mesh": self.settings()})
        return record
