"""The one model type the pipeline passes around: a backbone that yields penultimate features plus a
replaceable linear head.

BN conversion, the linear probe, fine-tuning and evaluation rely only on ``features(x)`` and ``head``, so
any backbone can be swapped in. Input normalisation belongs to the model (``preprocess``), so datasets
stay uint8 and each architecture brings its own mean/std.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TF_LITE_MEAN", "TF_LITE_STD", "DaftModel", "count_batchnorm"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite models expect (x - 127) / 128 on 0..255 pixels, i.e. ~0.5 / 0.5.
TF_LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TF_LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class DaftModel(nn.Module):
    """Backbone (normalised images -> penultimate features) + linear head, with its own preprocessing.

    ``spec`` is a JSON-able description that :func:`build_model` can rebuild the architecture from, so
    checkpoints hold only tensors and a small dict (loadable with ``weights_only=True``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        *,
        input_size: int,
        mean: tuple[float, ...] | list[float] = IMAGENET_MEAN,
        std: tuple[float, ...] | list[float] = IMAGENET_STD,
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std need 3 values (RGB), got {list(mean)} / {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.backbone = backbone
        self.head = nn.Linear(int(num_features), int(num_classes))
        self.input_size = int(input_size)
        self.num_features = int(num_features)
        # Non-persistent: they come from the spec, so state dicts stay pure weights.
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), False)
        self.spec: dict[str, Any] = dict(spec or {"name": "custom"})
        self.spec.update(
            num_classes=int(num_classes),
            input_size=self.input_size,
            num_features=self.num_features,
            mean=[float(m) for m in mean],
            std=[float(s) for s in std],
        )
        self.extra: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (N, 1|3, H, W) -> normalised (N, 3, S, S) on the model device."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
        x = x.to(self.mean.device)  # move before the float cast: uint8 transfers are 4x smaller
        if x.dtype == torch.uint8:
            x = x.to(self.mean.dtype).div_(255.0)
        elif x.is_floating_point():
            x = x.to(self.mean.dtype)
        else:
            raise TypeError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        channels = x.shape[1]
        if channels == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels != 3:
            raise ValueError(f"images need 1 or 3 channels, got {channels}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features): what the probe, DAFT and distortion metrics use."""
        return self.backbone(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def reset_head(self, init: Literal["zero", "random"], generator: torch.Generator | None = None) -> None:
        """Re-initialise the head: zeros, or nn.Linear's default init drawn from ``generator``."""
        w, b = self.head.weight, self.head.bias
        if init == "zero":
            w.zero_()
            if b is not None:
                b.zero_()
        elif init == "random":
            # nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
            # Drawn on the generator's device (CPU by default), whatever device the head is on.
            bound = 1.0 / math.sqrt(w.shape[1]) if w.shape[1] > 0 else 0.0
            dev = generator.device if generator is not None else torch.device("cpu")
            w.copy_(torch.rand(w.shape, generator=generator, device=dev) * (2 * bound) - bound)
            if b is not None:
                b.copy_(torch.rand(b.shape, generator=generator, device=dev) * (2 * bound) - bound)
        else:
            raise ValueError(f"head init must be 'zero' or 'random', got {init!r}")

    def replace_head(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """New randomly initialised head for ``num_classes`` classes on the same device/dtype."""
        old = self.head
        self.head = nn.Linear(self.num_features, int(num_classes)).to(
            device=old.weight.device, dtype=old.weight.dtype
        )
        self.reset_head("random", generator=generator)
        self.spec["num_classes"] = int(num_classes)


def count_batchnorm(module: nn.Module) -> int:
    """Number of BatchNorm layers (DAFT converts them, so a model without any is unusable)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
