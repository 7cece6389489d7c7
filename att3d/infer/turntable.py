"""Turntable videos: a full orbit around a mesh (rasterized) or a field (volume-rendered).

Both use the project's one camera model (:meth:`att3d.render.cameras.OrbitCameras.turntable`:
distance 2.2, 40 degree field of view, elevation 20 degrees, azimuth ``k 2 pi / n``) on a white
background. Meshes are drawn *unlit* by default: the field's colour, and so the baked texture,
already holds the shapes world's fixed-light shading (the prior was trained on shaded images),
and shading it again would darken it twice.

The frames are written to a video by :func:`att3d.infer.video.write_video`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import trimesh

from att3d.render.cameras import EVAL_ELEVATION_DEG, OrbitCameras

log = logging.getLogger(__name__)

Background = tuple[float, float, float]


def _as_tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def mesh_arrays(mesh: trimesh.Trimesh, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """What :func:`att3d.mesh.render_mesh` needs from a trimesh mesh.

    Returns:
        ``verts`` (V, 3) float32, ``faces`` (F, 3) long, and either ``uvs`` (V, 2) + ``texture``
        (H, W, 3) float in [0, 1] (textured meshes), or ``colours`` (V, 3) (vertex-coloured), or
        neither (drawn white).
    """
    device = torch.device(device)
    out = {"verts": _as_tensor(mesh.vertices, torch.float32, device),
           "faces": _as_tensor(mesh.faces, torch.long, device)}
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None:
        mat = visual.material
        image = getattr(mat, "baseColorTexture", None)
        if image is None:
            image = getattr(mat, "image", None)
        if image is not None:
            tex = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            out["uvs"] = _as_tensor(visual.uv, torch.float32, device)
            out["texture"] = torch.from_numpy(tex).to(device)
            return out
    if visual is not None and visual.kind == "vertex":
        out["colours"] = _as_tensor(visual.vertex_colors[:, :3], torch.float32, device) / 255.0
    return out


@torch.no_grad()
def mesh_turntable(mesh: trimesh.Trimesh, frames: int = 48, resolution: int = 256,
                   elevation_deg: float = EVAL_ELEVATION_DEG, background: Background = (1.0, 1.0, 1.0),
                   lambert: bool | None = None, device: str | torch.device = "cpu", batch: int = 8) -> np.ndarray:
    """Render a mesh from ``frames`` views around it with the pure-torch rasterizer.

    Args:
        mesh: a textured, vertex-coloured or plain ``trimesh.Trimesh`` (world frame of the field).
        frames: T views, azimuth ``k 2 pi / T``.
        resolution: H = W in pixels.
        elevation_deg: camera elevation.
        background: colour behind the mesh.
        lambert: shade with the shapes world's light (off: colours are drawn as they are); None: when the
            mesh's texture is an albedo (``mesh.metadata["att3d"]["shading"] == "lambert"``, from a mesh stage
            trained with shading), else off.
        device: where to rasterize.
        batch: views rasterized at once.

    Returns:
        (T, H, W, 3) uint8 frames.
    """
    from att3d.mesh import render_mesh

    device = torch.device(device)
    if lambert is None:
        lambert = (mesh.metadata.get("att3d") or {}).get("shading") == "lambert"
    arrays = mesh_arrays(mesh, device)
    cams = OrbitCameras.turntable(frames, elevation_deg=elevation_deg, device=device)
    if arrays["faces"].shape[0] == 0:
        img = np.empty((frames, resolution, resolution, 3), dtype=np.uint8)
        img[:] = (np.clip(np.asarray(background), 0, 1) * 255 + 0.5).astype(np.uint8)
        return img
    out = []
    for s in range(0, frames, batch):
        idx = torch.arange(s, min(s + batch, frames), device=device)
        rgb, _ = render_mesh(arrays["verts"], arrays["faces"], cams.index(idx), resolution,
                             colours=arrays.get("colours"), uvs=arrays.get("uvs"), texture=arrays.get("texture"),
                             background=background, lambert=lambert, cull_backfaces=False)
        out.append(rgb.clamp(0, 1).mul(255).add(0.5).to(torch.uint8).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def field_turntable(model: Any, cond: dict[str, torch.Tensor], frames: int = 48, resolution: int = 128,
                    elevation_deg: float = EVAL_ELEVATION_DEG, background: Background = (1.0, 1.0, 1.0),
                    batch: int = 8) -> np.ndarray:
    """Volume-render one prompt's field from ``frames`` views around it.

    Args:
        model: an :class:`~att3d.model.AmortizedModel` (its ``renderer`` and ``field``).
        cond: conditioning of ONE prompt, ``{name: (1, ...)}``.
        frames, resolution, elevation_deg, background, batch: as :func:`mesh_turntable`.

    Returns:
        (T, H, W, 3) uint8 frames.
    """
    device = model.device
    cams = OrbitCameras.turntable(frames, elevation_deg=elevation_deg, device=device)
    out = []
    for s in range(0, frames, batch):
        n = min(s + batch, frames) - s
        cb = {k: v[:1].to(device).expand(n, *v.shape[1:]) for k, v in cond.items()}
        res = model.renderer.render_chunked(model.field, cb, cams.index(torch.arange(s, s + n, device=device)),
                                            resolution, background=background)
        out.append(res["rgb"].clamp(0, 1).mul(255).add(0.5).to(torch.uint8).cpu())
    return torch.cat(out).numpy()

