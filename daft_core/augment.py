"""Training augmentation that runs on the batch's device, vectorised over the batch.

Images stay uint8 until they reach the device (4x less host->device traffic than float), and a whole batch
of random-resized crops + flips is one `affine_grid` + `grid_sample` call instead of per-image PIL work in
data-loader workers -- the CPU is no longer the bottleneck of the fine-tuning loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply; ``scale``/``ratio`` mean what they mean in torchvision's
    RandomResizedCrop (area fraction of the source image, aspect ratio w/h of the crop)."""

    hflip: bool = True
    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"AugmentConfig.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not 0 < rlo <= rhi:
            raise ValueError(f"AugmentConfig.ratio must satisfy 0 < lo <= hi, got {self.ratio}")

    @property
    def enabled(self) -> bool:
        return self.hflip or self.random_resized_crop

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        d = dict(d)
        for key in ("scale", "ratio"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _as_size(out_size: int | tuple[int, int]) -> tuple[int, int]:
    return (out_size, out_size) if isinstance(out_size, int) else (int(out_size[0]), int(out_size[1]))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def to_float_resized(x_uint8: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Evaluation input: uint8 (N,C,H,W) -> float in [0, 1] at ``out_size`` (antialiased bilinear), no aug."""
    size = _as_size(out_size)
    x = _to_float(x_uint8)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0,1) samples drawn on the generator's device (so a CPU generator works for a CUDA batch)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device).to(device, non_blocking=True)


def _crop_boxes(
    n: int,
    height: int,
    width: int,
    cfg: AugmentConfig,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample crop half-extents and centres in normalised [-1, 1] coordinates.

    Samples area and log-aspect-ratio like RandomResizedCrop, but clamps an oversize side to the image
    instead of rejection sampling (keeps it one vectorised draw; the distribution differs only at the edges).
    """
    u = _rand(4 * n, generator, device).view(4, n)
    lo, hi = cfg.scale
    area = (lo + (hi - lo) * u[0]) * (height * width)
    log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[1]
    ratio = torch.exp(log_r)
    frac_w = (torch.sqrt(area * ratio) / width).clamp(max=1.0)
    frac_h = (torch.sqrt(area / ratio) / height).clamp(max=1.0)
    centre_x = (1.0 - frac_w) * (2.0 * u[2] - 1.0)
    centre_y = (1.0 - frac_h) * (2.0 * u[3] - 1.0)
    return frac_w, frac_h, centre_x, centre_y


def augment_batch(
    x_uint8: torch.Tensor,
    cfg: AugmentConfig,
    out_size: int | tuple[int, int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random-resized-crop and/or horizontally flip a uint8 batch on its own device.

    Returns float32 (N, C, out_h, out_w) in [0, 1]; the channel count is unchanged. Deterministic given
    ``generator`` (CPU or on the batch's device): randomness is drawn in one fixed order per call.
    """
    if x_uint8.dim() != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {tuple(x_uint8.shape)}")
    if not cfg.enabled:
        return to_float_resized(x_uint8, out_size)
    n, _, height, width = x_uint8.shape
    device = x_uint8.device
    if not cfg.random_resized_crop:
        return _hflip_only(to_float_resized(x_uint8, out_size), generator)
    frac_w, frac_h, cx, cy = _crop_boxes(n, height, width, cfg, generator, device)
    flip = (
        torch.where(_rand(n, generator, device) < 0.5, -1.0, 1.0)
        if cfg.hflip
        else torch.ones(n, device=device)
    )
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = frac_w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = frac_h
    theta[:, 1, 2] = cy
    x = _to_float(x_uint8)
    grid = F.affine_grid(theta, [n, x.shape[1], *_as_size(out_size)], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0.0, 1.0)


def _hflip_only(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip a random half of the batch exactly (no resampling), as torch.flip would."""
    flip = _rand(x.shape[0], generator, x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
