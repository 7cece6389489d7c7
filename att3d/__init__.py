"""att3d: amortized text-to-3D generation."""

__version__ = "0.1.0"
