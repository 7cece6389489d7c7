"""Cameras and the volume renderer (``RENDERERS``: volume)."""

from att3d.render.cameras import OrbitCameras
from att3d.render.volume import VolumeRenderer, VolumeRendererConfig, render_chunked

__all__ = ["OrbitCameras", "VolumeRenderer", "VolumeRendererConfig", "render_chunked"]
