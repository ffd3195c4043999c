"""Fine-tuning methods as data: every method is a `Recipe` run by the one loop in `finetune.py`.

The recipes themselves (with their defaults) live in the method catalogue, `daft_core.methods`.

Keeping methods as plain, validated records (not subclasses) means the loop has a single code path and a
method's behaviour is fully described by the fields logged next to its results.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

HeadInit = Literal["random", "zero", "probe"]
BNMode = Literal["train", "eval"]

_HEAD_INITS = ("random", "zero", "probe")
_BN_MODES = ("train", "eval")


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning method.

    - ``convert_bn``: run DAFT's batch-norm conversion on ID train before training.
    - ``head_init``: ``"random"`` (fresh head), ``"zero"`` (weights, bias 0) or ``"probe"`` (linear probe's).
    - ``train_backbone``: False freezes every non-head parameter (``backbone_lr`` must then be 0).
    - ``bn_mode``: ``"eval"`` keeps BN layers in eval mode while training (running stats frozen), as in LP-FT.
    - ``head_lr`` / ``backbone_lr``: peak learning rates of the two SGD parameter groups.
    """

    name: str
    convert_bn: bool
    head_init: HeadInit
    train_backbone: bool
    bn_mode: BNMode
    head_lr: float
    backbone_lr: float

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for logging, params files and checkpoint fingerprints)."""
        return dataclasses.asdict(self)


def _validate(recipe: Recipe) -> None:
    """Reject recipes the loop could only run wrongly (silent no-ops, NaN lrs)."""
    if not isinstance(recipe.name, str) or not recipe.name:
        raise ValueError("Recipe.name must be a non-empty string")
    for flag in ("convert_bn", "train_backbone"):
        if not isinstance(getattr(recipe, flag), bool):
            raise ValueError(f"Recipe {recipe.name!r}: {flag} must be a bool, got {getattr(recipe, flag)!r}")
    if recipe.head_init not in _HEAD_INITS:
        raise ValueError(
            f"Recipe {recipe.name!r}: head_init must be one of {_HEAD_INITS}, got {recipe.head_init!r}"
        )
    if recipe.bn_mode not in _BN_MODES:
        raise ValueError(
            f"Recipe {recipe.name!r}: bn_mode must be one of {_BN_MODES}, got {recipe.bn_mode!r}"
        )
    for field in ("head_lr", "backbone_lr"):
        value = getattr(recipe, field)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"Recipe {recipe.name!r}: {field} must be a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Recipe {recipe.name!r}: {field} must be finite and >= 0, got {value!r}")
    if not recipe.train_backbone and recipe.backbone_lr != 0:
        raise ValueError(
            f"Recipe {recipe.name!r}: backbone is frozen (train_backbone=False) but backbone_lr="
            f"{recipe.backbone_lr}; set backbone_lr=0 or train_backbone=True"
        )
