"""The one camera model of att3d: orbit cameras that look at the origin.

Convention (``shared/WORLD.md``): right-handed, +y up. The eye of a camera with
azimuth ``phi`` and elevation ``theta`` (radians) at distance ``radius`` is::

    radius * (cos(theta) sin(phi), sin(theta), cos(theta) cos(phi))

so azimuth 0 looks from +z towards -z. Images are square; pixel (row 0, col 0)
is the top-left and rays go through pixel centres. A camera is also described to
view-conditioned priors as the 4-vector ``(sin phi, cos phi, sin theta, cos theta)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: Distance of the eye from the origin in the shapes world.
DEFAULT_RADIUS = 2.2
#: Vertical field of view in degrees in the shapes world.
DEFAULT_FOV_DEG = 40.0
#: Training views: elevation range in degrees.
TRAIN_ELEVATION_DEG = (-10.0, 45.0)
#: Evaluation views: elevation in degrees (azimuths k*pi/4, k = 0..7).
EVAL_ELEVATION_DEG = 20.0


def camera_features(vector: torch.Tensor, harmonics: int = 1) -> torch.Tensor:
    """A view-conditioned prior's camera input from the camera 4-vector, with azimuth harmonics.

    The 4-vector ``(sin phi, cos phi, sin theta, cos theta)`` (:meth:`OrbitCameras.as_vector`) is kept as the
    first 4 columns; ``harmonics = K > 1`` appends ``sin k phi, cos k phi`` for ``k = 2..K``, computed from the
    4-vector by the angle-addition formulas (exact, no ``atan2``). A shape with a k-fold symmetry about the vertical
    axis (a cube or a pyramid: 4) looks the same at ``phi`` and ``phi + 2 pi / k``, so what tells its views apart
    is ``k phi``: with the harmonics the network reads it off its input instead of having to build a k-times
    faster oscillation out of ``sin phi, cos phi`` itself.

    Args:
        vector: (B, 4) camera 4-vectors; harmonics: K >= 1 (1: the 4-vector unchanged).

    Returns:
        (B, 4 + 2 (K - 1)).
    """
    if harmonics < 1:
        raise ValueError(f"harmonics must be >= 1, got {harmonics}")
    if vector.shape[-1] != 4:
        raise ValueError(f"camera vectors are (B, 4), got {tuple(vector.shape)}")
    s1, c1 = vector[..., 0], vector[..., 1]
    cols, s, c = [vector], s1, c1
    for _ in range(2, int(harmonics) + 1):
        s, c = s * c1 + c * s1, c * c1 - s * s1
        cols.append(torch.stack([s, c], dim=-1))
    return torch.cat(cols, dim=-1)


def camera_feature_dim(harmonics: int = 1) -> int:
    """The width of :func:`camera_features`: ``4 + 2 (harmonics - 1)``."""
    return 4 + 2 * (int(harmonics) - 1)


#: The per-pixel camera maps a view-conditioned prior can take beside the image (:func:`camera_map`).
CAMERA_MAPS = ("none", "ray")


def camera_map_channels(kind: str) -> int:
    """The channels :func:`camera_map` adds to a prior's input: 0 for ``none``, 6 for ``ray``."""
    if kind not in CAMERA_MAPS:
        raise ValueError(f"camera_map must be one of {', '.join(CAMERA_MAPS)}, got {kind!r}")
    return 0 if kind == "none" else 6


def camera_map(cameras: OrbitCameras, resolution: int, kind: str = "ray") -> torch.Tensor | None:
    """A per-pixel picture of the camera, for a prior to read beside the image (None for ``kind="none"``).

    ``ray``: each pixel's ray as the point of the ray nearest the world's origin, ``p = o - (o . d) d``, and its
    unit direction ``d`` (6 channels; the Pluecker coordinates up to the bilinear map ``p = d x (o x d)``). Where
    the camera 4-vector tells a network the view once per image, this tells every convolution which world point
    its pixel looks past: a face of the axis-aligned cube is a plane ``p_x = 0.4`` seen edge-on, and a view turned
    by a few degrees moves the map by a pixel's worth at the object's silhouette.

    Args:
        cameras: B cameras; resolution: the image side R; kind: one of :data:`CAMERA_MAPS`.

    Returns:
        (B, 6, R, R) (channels ``p_x, p_y, p_z, d_x, d_y, d_z``), or None for ``none``.
    """
    if camera_map_channels(kind) == 0:
        return None
    rays_o, rays_d = cameras.rays(resolution)  # (B, R, R, 3) each
    p = rays_o - (rays_o * rays_d).sum(-1, keepdim=True) * rays_d
    return torch.cat([p, rays_d], dim=-1).permute(0, 3, 1, 2).contiguous()


def orbit_eye(phi: torch.Tensor, theta: torch.Tensor, radius: torch.Tensor | float = DEFAULT_RADIUS) -> torch.Tensor:
    """Eye positions of orbit cameras.

    Args:
        phi: (B,) azimuth in radians.
        theta: (B,) elevation in radians.
        radius: scalar or (B,) distance from the origin.

    Returns:
        (B, 3) eye positions.
    """
    r = torch.as_tensor(radius, dtype=phi.dtype, device=phi.device)
    return torch.stack(
        [r * torch.cos(theta) * torch.sin(phi), r * torch.sin(theta) * torch.ones_like(phi),
         r * torch.cos(theta) * torch.cos(phi)],
        dim=-1,
    )


def look_at(eye: torch.Tensor, target: torch.Tensor | None = None,
            up: tuple[float, float, float] = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """Camera-to-world rotations (OpenGL style: the camera looks along its -z axis).

    Args:
        eye: (B, 3) eye positions.
        target: (B, 3) or None for the origin.

    Returns:
        (B, 3, 3) rotations whose columns are the camera's right, up and back axes in world space.
    """
    if target is None:
        target = torch.zeros_like(eye)
    forward = torch.nn.functional.normalize(target - eye, dim=-1)
    up_t = torch.tensor(up, dtype=eye.dtype, device=eye.device).expand_as(forward)
    right = torch.nn.functional.normalize(torch.cross(forward, up_t, dim=-1), dim=-1)
    true_up = torch.cross(right, forward, dim=-1)
    return torch.stack([right, true_up, -forward], dim=-1)


def pixel_directions(resolution: int, fov_deg: float = DEFAULT_FOV_DEG, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unnormalised ray directions in camera space through pixel centres.

    Returns:
        (H, W, 3) directions with z = -1 (row 0 at the top, column 0 at the left).
    """
    half = math.tan(math.radians(fov_deg) / 2.0)
    idx = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution * 2.0 - 1.0
    ys = -idx * half  # row 0 is the top: +y
    xs = idx * half
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y, -torch.ones_like(x)], dim=-1)


@dataclass
class OrbitCameras:
    """A batch of orbit cameras looking at the origin.

    Attributes:
        phi: (B,) azimuth in radians.
        theta: (B,) elevation in radians.
        radius: (B,) distance of the eye from the origin.
        fov_deg: vertical field of view in degrees (shared by the batch).
    """

    phi: torch.Tensor
    theta: torch.Tensor
    radius: torch.Tensor
    fov_deg: float = DEFAULT_FOV_DEG

    def __len__(self) -> int:
        return self.phi.shape[0]

    @property
    def device(self) -> torch.device:
        return self.phi.device

    @classmethod
    def from_angles(cls, phi, theta, radius: float = DEFAULT_RADIUS, fov_deg: float = DEFAULT_FOV_DEG,
                    device: torch.device | str | None = None) -> OrbitCameras:
        """Cameras from azimuths and elevations in radians (sequences or tensors)."""
        phi_t = torch.as_tensor(phi, dtype=torch.float32, device=device).reshape(-1)
        theta_t = torch.as_tensor(theta, dtype=torch.float32, device=device).reshape(-1).expand_as(phi_t).clone()
        return cls(phi_t, theta_t, torch.full_like(phi_t, float(radius)), fov_deg)

    @classmethod
    def sample_training(cls, n: int, generator: torch.Generator | None = None,
                        elevation_deg: tuple[float, float] = TRAIN_ELEVATION_DEG, radius: float = DEFAULT_RADIUS,
                        fov_deg: float = DEFAULT_FOV_DEG, device: torch.device | str | None = None) -> OrbitCameras:
        """Random training views: azimuth uniform in [0, 2 pi), elevation uniform in ``elevation_deg``."""
        u = torch.rand(2, n, generator=generator)
        phi = u[0] * 2.0 * math.pi
        lo, hi = (math.radians(a) for a in elevation_deg)
        theta = lo + u[1] * (hi - lo)
        return cls.from_angles(phi, theta, radius, fov_deg, device=device)

    @classmethod
    def evaluation(cls, n_views: int = 8, elevation_deg: float = EVAL_ELEVATION_DEG, radius: float = DEFAULT_RADIUS,
                   fov_deg: float = DEFAULT_FOV_DEG, device: torch.device | str | None = None) -> OrbitCameras:
        """The evaluation views of WORLD.md: azimuth k * 2 pi / n_views, fixed elevation."""
        phi = torch.arange(n_views, dtype=torch.float32) * (2.0 * math.pi / n_views)
        return cls.from_angles(phi, math.radians(elevation_deg), radius, fov_deg, device=device)

    @classmethod
    def turntable(cls, n_frames: int, elevation_deg: float = EVAL_ELEVATION_DEG, radius: float = DEFAULT_RADIUS,
                  fov_deg: float = DEFAULT_FOV_DEG, device: torch.device | str | None = None) -> OrbitCameras:
        """A full orbit of ``n_frames`` views at a fixed elevation."""
        return cls.evaluation(n_frames, elevation_deg, radius, fov_deg, device)

    def to(self, device: torch.device | str) -> OrbitCameras:
        return OrbitCameras(self.phi.to(device), self.theta.to(device), self.radius.to(device), self.fov_deg)

    def index(self, idx) -> OrbitCameras:
        """A sub-batch (any tensor index)."""
        return OrbitCameras(self.phi[idx].reshape(-1), self.theta[idx].reshape(-1), self.radius[idx].reshape(-1),
                            self.fov_deg)

    def eyes(self) -> torch.Tensor:
        """(B, 3) eye positions."""
        return orbit_eye(self.phi, self.theta, self.radius)

    def c2w(self) -> torch.Tensor:
        """(B, 3, 3) camera-to-world rotations."""
        return look_at(self.eyes())

    def as_vector(self) -> torch.Tensor:
        """(B, 4) conditioning vector ``(sin phi, cos phi, sin theta, cos theta)``."""
        return torch.stack([torch.sin(self.phi), torch.cos(self.phi), torch.sin(self.theta), torch.cos(self.theta)], -1)

    def rays(self, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """World-space rays through pixel centres.

        Returns:
            rays_o: (B, H, W, 3) origins; rays_d: (B, H, W, 3) unit directions.
        """
        dirs = pixel_directions(resolution, self.fov_deg, self.device)  # (H, W, 3)
        rot = self.c2w()  # (B, 3, 3)
        rays_d = torch.einsum("bij,hwj->bhwi", rot, dirs)
        rays_d = torch.nn.functional.normalize(rays_d, dim=-1)
        rays_o = self.eyes()[:, None, None, :].expand_as(rays_d)
        return rays_o, rays_d

    def project(self, points: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points into pixel coordinates.

        Args:
            points: (B, N, 3) world points.

        Returns:
            xy: (B, N, 2) continuous pixel coordinates (x = column, y = row; pixel centres at +0.5);
            depth: (B, N) distance along the camera's viewing axis (positive in front).
        """
        rot = self.c2w()  # columns: right, up, back
        rel = points - self.eyes()[:, None, :]
        cam = torch.einsum("bji,bnj->bni", rot, rel)  # world -> camera: R^T (p - eye)
        depth = -cam[..., 2]
        half = math.tan(math.radians(self.fov_deg) / 2.0)
        ndc_x = cam[..., 0] / (depth * half)
        ndc_y = cam[..., 1] / (depth * half)
        col = (ndc_x + 1.0) * 0.5 * resolution
        row = (1.0 - ndc_y) * 0.5 * resolution
        return torch.stack([col, row], dim=-1), depth
