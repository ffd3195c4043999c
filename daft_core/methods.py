"""The one catalogue of methods: everything the pipeline, the report and the benchmark need to know.

Each entry holds the method's recipe (its defaults), the model its branch starts from, its registry alias,
how a sweep varies it and its default sweep grid. The catalogue order is the display order. params
validation, DVC's ``foreach``, the Kubeflow DAG and sweep, the report and ``benchmarks.compare_methods``
read it; adding a method is one entry here (plus tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from daft_core.recipes import Recipe

Start = Literal["pretrained", "bn_converted", "linear_probe"]
SweepKind = Literal["lr", "grid", "none"]
LrPair = tuple[float, float]  # (head_lr, backbone_lr)

# The models a branch can start from (pipeline stages that produce a model), with their registry aliases.
START_ALIASES: MappingProxyType[str, str] = MappingProxyType(
    {"pretrained": "pretrained", "bn_converted": "bn-converted", "linear_probe": "linear-probe"}
)
STARTS: tuple[str, ...] = tuple(START_ALIASES)


@dataclass(frozen=True)
class Method:
    """One method of the comparison.

    - ``recipe``: the fine-tuning recipe with its default learning rates (``lp`` is the probe itself).
    - ``start``: the pipeline model its branch begins from.
    - ``alias``: its alias in the model registry (MLflow aliases use dashes).
    - ``finetuned``: run by the fine-tuning loop (False: ``lp``, the logistic-regression probe).
    - ``sweep``: ``"lr"`` one lr for both groups, ``"grid"`` head lr x backbone lr, ``"none"`` not swept.
    - ``grid``: the default sweep points (head_lr, backbone_lr), selected by ID val.
    - ``lr_from``: an ablation without a grid of its own reuses this method's selected lrs (benchmark).
    """

    name: str
    recipe: Recipe
    start: Start
    alias: str
    finetuned: bool = True
    sweep: SweepKind = "lr"
    grid: tuple[LrPair, ...] = ()
    lr_from: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.recipe.name != self.name:
            raise ValueError(f"Method {self.name!r}: recipe is named {self.recipe.name!r}")
        if self.start not in START_ALIASES:
            raise ValueError(f"Method {self.name!r}: start must be one of {STARTS}, got {self.start!r}")
        if self.finetuned and self.sweep == "none":
            raise ValueError(f"Method {self.name!r}: a fine-tuned method must say how it is swept")
        if self.sweep == "lr" and any(h != b for h, b in self.grid):
            raise ValueError(f"Method {self.name!r}: an 'lr' sweep uses one lr for both groups")

    def lr_list(self) -> list[float]:
        """The grid as one lr per point (``sweep == "lr"``)."""
        return [h for h, _ in self.grid]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = [list(p) for p in self.grid]
        return d


def _same(*lrs: float) -> tuple[LrPair, ...]:
    return tuple((lr, lr) for lr in lrs)


def _cross(heads: tuple[float, ...], backbones: tuple[float, ...]) -> tuple[LrPair, ...]:
    return tuple((h, b) for h in heads for b in backbones)


# Default grids: selected on ID val for EfficientNet-Lite0 at 48 px on digits (benchmarks/results). Its
# 1280-d penultimate features have norms ~60, so a zero-initialised head trained by SGD (momentum 0.9, batch
# 64) on raw features is best at head lr ~3e-3..3e-2 and diverges beyond ~0.1 (the paper's ResNet-50 head
# lrs of 0.1-10 do not transfer); the backbone lrs straddle 1e-3.
# Recipe defaults follow the paper: one lr for FT / LP-FT (LP-FT's smaller, its head already fits); DAFT a
# much larger head lr (grid 0.1-10) than backbone lr (grid 1e-6-1e-4).
_CATALOGUE: tuple[Method, ...] = (
    Method(
        "lp",
        Recipe("lp", False, "random", False, "eval", head_lr=1e-2, backbone_lr=0.0),
        start="linear_probe",
        alias="linear-probe",
        finetuned=False,
        sweep="none",
        description="linear probe: logistic regression on frozen features, C chosen on ID val",
    ),
    Method(
        "ft",
        Recipe("ft", False, "random", True, "train", head_lr=1e-2, backbone_lr=1e-2),
        start="pretrained",
        alias="ft",
        grid=_same(1e-2, 3e-2, 1e-1),
        description="full fine-tuning from a random head",
    ),
    Method(
        "lp_ft",
        Recipe("lp_ft", False, "probe", True, "eval", head_lr=1e-3, backbone_lr=1e-3),
        start="linear_probe",
        alias="lp-ft",
        grid=_same(1e-3, 3e-3, 1e-2),
        description="LP-FT (Kumar et al. 2022): fine-tuning from the probe's head, BN in eval mode",
    ),
    Method(
        "daft",
        Recipe("daft", True, "zero", True, "train", head_lr=1e-1, backbone_lr=1e-4),
        start="bn_converted",
        alias="daft",
        sweep="grid",
        grid=_cross((1e-2, 3e-2), (1e-3, 1e-2)),
        description="DAFT: BN conversion, zero head with a fast lr, slow backbone, BN in train mode",
    ),
    Method(
        "daft_bn_only",
        Recipe("daft_bn_only", True, "random", True, "train", head_lr=1e-2, backbone_lr=1e-2),
        start="bn_converted",
        alias="daft-bn-only",
        lr_from="ft",
        description="ablation: BN conversion only",
    ),
    Method(
        "daft_fast_head_only",
        Recipe("daft_fast_head_only", False, "zero", True, "train", head_lr=1e-1, backbone_lr=1e-4),
        start="pretrained",
        alias="daft-fast-head-only",
        sweep="grid",
        lr_from="daft",
        description="ablation: the fast zero head only (no BN conversion)",
    ),
)

METHODS: MappingProxyType[str, Method] = MappingProxyType({m.name: m for m in _CATALOGUE})
METHOD_ORDER: tuple[str, ...] = tuple(METHODS)
FINETUNED_METHODS: tuple[str, ...] = tuple(m.name for m in _CATALOGUE if m.finetuned)
RECIPES: MappingProxyType[str, Recipe] = MappingProxyType({m.name: m.recipe for m in _CATALOGUE})


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid names: {', '.join(METHOD_ORDER)}")
    return METHODS[name]


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """The named recipe with ``overrides`` applied; unknown names/fields or bad values raise ValueError."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; valid names: {', '.join(sorted(RECIPES))}")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown Recipe override(s) {unknown}; valid fields: {sorted(fields)}")
    return dataclasses.replace(RECIPES[name], **overrides)


def alias_for(stage_or_method: str) -> str:
    """Registry alias of a pipeline stage (``pretrained``, ``bn_converted``, ``linear_probe``) or a method."""
    if stage_or_method in METHODS:
        return METHODS[stage_or_method].alias
    if stage_or_method in START_ALIASES:
        return START_ALIASES[stage_or_method]
    raise ValueError(f"no registry alias for {stage_or_method!r}")


def display_order(names: Any) -> list[str]:
    """`names` in catalogue order; unknown names last, alphabetically."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))
