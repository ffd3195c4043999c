"""Where a module lives: the device of its first parameter or buffer (CPU for a stateless module)."""

import torch
from torch import nn


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
