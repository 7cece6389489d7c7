"""One rule for turning a device name into a :class:`torch.device`."""

from __future__ import annotations

import torch

from att3d.utils.errors import Att3dError


def pick_device(name: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is available, else ``cpu``; anything else as ``torch.device`` reads it.

    Raises:
        Att3dError: an unknown device name, or a CUDA device without CUDA (one line).
    """
    if isinstance(name, torch.device):
        device = name
    elif str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(str(name))
        except (RuntimeError, ValueError):
            raise Att3dError(f"unknown device {str(name)!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Att3dError(f"device {str(name)!r} requested but CUDA is not available")
    if device.type not in ("cpu", "cuda", "mps"):
        raise Att3dError(f"unsupported device {str(name)!r}; use cpu, cuda, cuda:N or auto")
    return device
