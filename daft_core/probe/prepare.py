"""Turn caller inputs into the solver's problem: validated tensors, normalised with train statistics.

Normalising is what lets one C grid fit every backbone. Three modes (``NORMALIZE_MODES``):

- ``"scalar"`` (default, the paper's: DAFT's ``lp_log_reg.py``): ONE mean and ONE std over every entry
  of the train feature matrix, ``(x - mean) / std``. Every feature keeps its relative scale, so a feature
  that barely moves on train keeps a small input and gets a small weight.
- ``"per_feature"``: sklearn's ``StandardScaler`` (a mean and std per column). Columns constant on train
  (std below ``_STD_FLOOR``) are left out of the solve and get weight 0. Near-constant columns are blown
  up to unit variance, and folding back divides their weights by a tiny std: large raw weights that turn
  small OOD feature shifts into logit noise.
- ``"none"``: raw features.

The statistics are folded back into the head afterwards (``fit.fold_head``), so the head applies to raw
features in every mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch

__all__ = [
    "NORMALIZE_MODES",
    "NormalisedProblem",
    "Normalize",
    "check_normalize",
    "normalise",
    "sorted_cs",
    "validate_inputs",
]

Normalize = Literal["scalar", "per_feature", "none"]
NORMALIZE_MODES: tuple[str, ...] = get_args(Normalize)

_STD_FLOOR = 1e-6  # per_feature: features with a smaller train std are constant on train: left out, weight 0
_CHUNK = 8192  # rows per chunk when touching features in float64 (bounds the extra memory)


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach()
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as e:
        raise ValueError(f"{name} must be a tensor or array-like: {e}") from e


def _check_shapes(xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor) -> None:
    for name, x in (("train_feats", xt), ("val_feats", xv)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}; flatten the features")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty: the probe needs at least one row in both train and val")
    for name, y in (("train_y", yt), ("val_y", yv)):
        if y.ndim != 1:
            raise ValueError(f"{name} must be 1-D (N,), got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(f"train_feats has {xt.shape[0]} rows but train_y has {yt.shape[0]} labels")
    if xv.shape[0] != yv.shape[0]:
        raise ValueError(f"val_feats has {xv.shape[0]} rows but val_y has {yv.shape[0]} labels")
    if xt.shape[1] != xv.shape[1]:
        raise ValueError(
            f"train_feats has {xt.shape[1]} features but val_feats has {xv.shape[1]}: "
            "extract both with the same backbone"
        )
    for name, x in (("train_feats", xt), ("val_feats", xv)):
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            rows = int(bad.any(dim=1).sum())
            raise ValueError(
                f"{name} has non-finite values (NaN/inf) in {rows} rows: check the backbone and its inputs "
                "(e.g. a diverged checkpoint) before probing"
            )


def _check_classes(yt: torch.Tensor, yv: torch.Tensor, num_classes: int | None) -> int:
    lo = min(int(yt.min()), int(yv.min()))
    hi = max(int(yt.max()), int(yv.max()))
    if num_classes is None:
        num_classes = hi + 1
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found range [{lo}, {hi}]: "
            "pass num_classes= the dataset's class count, or remap the labels"
        )
    if num_classes < 2 or int(torch.unique(yt).numel()) < 2:
        raise ValueError(
            f"train_y holds {int(torch.unique(yt).numel())} distinct class(es) (num_classes={num_classes}); "
            "logistic regression needs at least 2: check the train split"
        )
    return int(num_classes)


def validate_inputs(
    train_feats: Any, train_y: Any, val_feats: Any, val_y: Any, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Check shapes, finiteness and label ranges up front, so failures say what to fix."""
    xt, yt = _as_tensor(train_feats, "train_feats"), _as_tensor(train_y, "train_y")
    xv, yv = _as_tensor(val_feats, "val_feats"), _as_tensor(val_y, "val_y")
    _check_shapes(xt, yt, xv, yv)
    yt, yv = yt.to(torch.int64), yv.to(torch.int64)
    return xt, yt, xv, yv, _check_classes(yt, yv, num_classes)


def sorted_cs(Cs: Sequence[float] | np.ndarray) -> np.ndarray:
    """Increasing order is what makes warm starts (and the exact memory shift) pay off."""
    cs = np.sort(np.asarray(Cs, dtype=np.float64).reshape(-1))
    if cs.size == 0 or not np.all(np.isfinite(cs)) or cs[0] <= 0:
        raise ValueError(f"Cs must be a non-empty list of positive finite values, got {cs.tolist()}")
    return cs


def check_normalize(normalize: str) -> str:
    """Refuse an unknown mode up front, naming the valid ones."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(
            f"normalize must be one of {', '.join(map(repr, NORMALIZE_MODES))}, got {normalize!r} "
            "('scalar' is the paper's: one mean and one std over all train features)"
        )
    return normalize


def _moments(x: torch.Tensor, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Train mean and population std in float64 (two passes, chunked)."""
    n = x.shape[0]
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=dev)
    for i in range(0, n, _CHUNK):
        total += x[i : i + _CHUNK].to(dev, torch.float64).sum(0)
    mean = total / n
    sq = torch.zeros_like(mean)
    for i in range(0, n, _CHUNK):
        sq += (x[i : i + _CHUNK].to(dev, torch.float64) - mean).square().sum(0)
    return mean, (sq / n).sqrt()


def _normalise_aug(
    x: torch.Tensor,
    live: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    dev: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[(x - mean) / std, 1]`` on ``dev`` in the solver's dtype; the ones column carries the bias.

    ``mean``/``std`` are per live column (a scalar mode repeats its one value): the float64 detour keeps
    the shift exact even for features with a large offset.
    """
    n, dim = x.shape[0], mean.shape[0]
    out = torch.empty(n, dim + 1, device=dev, dtype=dtype)
    out[:, dim] = 1.0
    for i in range(0, n, _CHUNK):
        rows = x[i : i + _CHUNK].to(dev)[:, live].to(torch.float64)
        out[i : i + _CHUNK, :dim] = ((rows - mean) / std).to(dtype)
    return out


@dataclass
class NormalisedProblem:
    """Train/val on the solver's device and dtype, plus what folding the head back needs."""

    x_train: torch.Tensor  # (N, D_live + 1): normalised live features and a ones column
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    mean: torch.Tensor  # float64 (D_live,): the shift of each live column (one value repeated in "scalar")
    std: torch.Tensor  # float64 (D_live,): the scale of each live column
    live: torch.Tensor  # bool (D,): columns in the solve (all but per_feature's constant ones)
    num_features: int  # D, the raw feature count
    normalize: str

    @property
    def device(self) -> torch.device:
        return self.x_train.device


def _statistics(
    mean_all: torch.Tensor, std_all: torch.Tensor, normalize: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(live mask, shift, scale) of ``normalize`` from the per-column train moments (float64)."""
    d = mean_all.shape[0]
    if normalize == "per_feature":
        live = std_all >= _STD_FLOOR
        if not bool(live.any()):
            raise ValueError(
                "every feature is constant on train_feats: the backbone output carries no signal"
            )
        return live, mean_all[live], std_all[live]
    if not bool((std_all > 0).any()):
        raise ValueError("every feature is constant on train_feats: the backbone output carries no signal")
    live = torch.ones(d, dtype=torch.bool, device=mean_all.device)
    if normalize == "none":
        return live, torch.zeros_like(mean_all), torch.ones_like(std_all)
    # scalar: np.mean / np.std of the whole matrix; with equal counts per column the pooled moments are
    # the column moments' averages (law of total variance), so no extra pass over the data is needed
    mean = mean_all.mean()
    std = (std_all.square() + (mean_all - mean).square()).mean().sqrt()
    return live, mean.expand(d).clone(), std.expand(d).clone()


def normalise(
    xt: torch.Tensor,
    yt: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    dev: torch.device,
    dtype: torch.dtype,
    normalize: str = "scalar",
) -> NormalisedProblem:
    """Normalise train and val with train statistics (float64) as ``normalize`` says (module docstring)."""
    check_normalize(normalize)
    live, mean, std = _statistics(*_moments(xt, dev), normalize)
    return NormalisedProblem(
        x_train=_normalise_aug(xt, live, mean, std, dev, dtype),
        y_train=yt.to(dev),
        x_val=_normalise_aug(xv, live, mean, std, dev, dtype),
        y_val=yv.to(dev),
        mean=mean,
        std=std,
        live=live,
        num_features=xt.shape[1],
        normalize=normalize,
    )
