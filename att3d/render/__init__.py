"""Cameras, shading and the volume renderer (``RENDERERS``: volume).

Every module of this package is imported when the registry is first used, so a new renderer module needs no
line here.
"""

from att3d.render.cameras import OrbitCameras
from att3d.render.volume import VolumeRenderer

__all__ = ["OrbitCameras", "VolumeRenderer"]
