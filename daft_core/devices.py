"""Devices: the one place "auto" / "cpu" / "cuda[:i]" becomes a torch.device, and where a module lives."""

from __future__ import annotations

import torch
from torch import nn

from daft_core.errors import DeviceError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU. An explicit CUDA device must exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda[:index]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} requested but no CUDA device is available; use auto or cpu")
    return device


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
