"""The one catalogue of methods: everything the pipeline, the report and the benchmark need to know.

Each entry holds the method's recipe (its defaults), the model its branch starts from, its registry alias,
how a sweep varies it and its default sweep grid. The catalogue order is the display order. params
validation, DVC's ``foreach``, the Kubeflow DAG and sweep, the report and ``benchmarks.compare_methods``
read it; adding a method is one entry here (plus tests).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from daft_core.recipes import Recipe

Start = Literal["pretrained", "bn_converted", "linear_probe"]
SweepKind = Literal["lr", "grid", "none"]
LrPair = tuple[float, float]  # (head_lr, backbone_lr)

# "Head lr >> backbone lr": the least ratio a fast-head method's run may have and still be the published
# method. The paper's grids never go below 1e3 (head 0.1-10, backbone 1e-6-1e-4); 10 leaves room for
# presets that train far fewer steps while still refusing equal (or inverted) rates.
MIN_HEAD_RATIO = 10.0

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
      It is also the published method's lr structure: an ``"lr"`` method uses one lr for both groups, a
      ``"grid"`` method a fast head (head lr >= ``MIN_HEAD_RATIO`` x backbone lr); see `published_violation`.
    - ``grid``: the default sweep points (head_lr, backbone_lr), selected by ID val.
    """

    name: str
    recipe: Recipe
    start: Start
    alias: str
    finetuned: bool = True
    sweep: SweepKind = "lr"
    grid: tuple[LrPair, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if self.recipe.name != self.name:
            raise ValueError(f"Method {self.name!r}: recipe is named {self.recipe.name!r}")
        if self.start not in START_ALIASES:
            raise ValueError(f"Method {self.name!r}: start must be one of {STARTS}, got {self.start!r}")
        if self.finetuned and self.sweep == "none":
            raise ValueError(f"Method {self.name!r}: a fine-tuned method must say how it is swept")
        for h, b in (*self.grid, (self.recipe.head_lr, self.recipe.backbone_lr)):
            reason = self.published_violation(h, b)
            if reason is not None and self.finetuned:
                raise ValueError(f"Method {self.name!r}: default lrs {h}/{b}: {reason}")

    def published_violation(self, head_lr: float, backbone_lr: float) -> str | None:
        """Why (head_lr, backbone_lr) cannot be this method as published, or None when it can.

        A run that breaks the published lr structure is allowed only as a named variant (params
        ``variant:``, the benchmark's ``--variant``), and the report marks it.
        """
        if not self.finetuned:
            return None
        if self.sweep == "lr" and head_lr != backbone_lr:
            return (
                f"{self.name} as published trains head and backbone with one learning rate, got head "
                f"{head_lr:g}, backbone {backbone_lr:g}"
            )
        if self.sweep == "grid" and not head_lr >= MIN_HEAD_RATIO * backbone_lr:
            return (
                f"{self.name} as published trains its zero head much faster than the backbone (head lr >= "
                f"{MIN_HEAD_RATIO:g} x backbone lr), got head {head_lr:g}, backbone {backbone_lr:g}"
            )
        return None

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


# Default grids, selected on ID val (benchmarks/results/compare_methods_digits.md). The published recipes'
# lr structure: FT and LP-FT one lr for both groups (LP-FT's smaller: its head already fits); DAFT a zero
# head with a fast lr and a slow backbone (official code: head 1.0 while the backbone sweeps
# {1e-4 .. 3e-6}, then the head over {10, 3, 0.3, 0.1}); its ablations as the official code defines them.
# The paper's absolute head lrs transfer to EfficientNet-Lite0's features (norms ~60) at the paper's small
# backbone lrs: on digits, head 0.3 .. 10 at backbone 1e-4 all train (ID val 93-96 %), so no rescaling is
# needed; what diverges is a fast head with a fast backbone (head 1 / backbone 3e-3: 60 %, 1e-2: 29 %).
# The backbone grid sits one step above the paper's (1e-4 .. 1e-3 rather than 3e-6 .. 1e-4): the default
# preset trains for ~50 steps, the paper for ~16k; 1e-5 underfits there (88 % ID val).
_DAFT_HEADS = (0.3, 1.0, 3.0)
_DAFT_BACKBONES = (1e-4, 3e-4, 1e-3)
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
        Recipe("ft", False, "random", True, "train", head_lr=1e-1, backbone_lr=1e-1),
        start="pretrained",
        alias="ft",
        grid=_same(1e-2, 3e-2, 1e-1),
        description="full fine-tuning from a random head",
    ),
    Method(
        "lp_ft",
        Recipe("lp_ft", False, "probe", True, "eval", head_lr=3e-4, backbone_lr=3e-4),
        start="linear_probe",
        alias="lp-ft",
        grid=_same(1e-4, 3e-4, 1e-3),
        description="LP-FT (Kumar et al. 2022): fine-tuning from the probe's head, BN in eval mode",
    ),
    Method(
        "daft",
        Recipe("daft", True, "zero", True, "train", head_lr=1.0, backbone_lr=1e-4),
        start="bn_converted",
        alias="daft",
        sweep="grid",
        grid=_cross(_DAFT_HEADS, _DAFT_BACKBONES),
        description="DAFT: BN conversion, zero head with a fast lr, slow backbone, BN in train mode",
    ),
    Method(
        "daft_bn_only",
        Recipe("daft_bn_only", True, "zero", True, "eval", head_lr=1e-2, backbone_lr=1e-2),
        start="bn_converted",
        alias="daft-bn-only",
        grid=_same(3e-3, 1e-2, 3e-2),
        description="ablation (official only_bn_conversion): BN conversion, zero head, one lr, BN eval",
    ),
    Method(
        "daft_fast_head_only",
        Recipe("daft_fast_head_only", False, "zero", True, "eval", head_lr=1.0, backbone_lr=1e-4),
        start="pretrained",
        alias="daft-fast-head-only",
        sweep="grid",
        grid=_cross((1.0,), _DAFT_BACKBONES),
        description="ablation (official fast head only): no BN conversion, zero head at lr 1.0, BN eval",
    ),
)

METHODS: MappingProxyType[str, Method] = MappingProxyType({m.name: m for m in _CATALOGUE})
METHOD_ORDER: tuple[str, ...] = tuple(METHODS)
FINETUNED_METHODS: tuple[str, ...] = tuple(m.name for m in _CATALOGUE if m.finetuned)
RECIPES: MappingProxyType[str, Recipe] = MappingProxyType({m.name: m.recipe for m in _CATALOGUE})


def parse_lrs(text: str, what: str = "learning rates") -> list[LrPair]:
    """``0.1,0.3`` (one lr for both groups) or ``1:1e-4,3:1e-4`` (head:backbone) as (head, backbone)
    pairs: the grid syntax of ``pipelines.dvc_sweep --grid`` and the benchmark's ``--grid``/``--lr``."""
    out: list[LrPair] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        head, sep, backbone = item.partition(":")
        try:
            pair = (float(head), float(backbone if sep else head))
        except ValueError:
            raise ValueError(f"{what}: {item!r} is not LR or HEAD:BACKBONE") from None
        if not all(math.isfinite(v) and v >= 0 for v in pair):
            raise ValueError(f"{what}: learning rates must be finite and >= 0, got {item!r}")
        out.append(pair)
    if not out:
        raise ValueError(f"{what}: empty learning-rate list")
    return out


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
