"""The single source of hyper-parameters: params.yaml, validated on load.

Every step reads its own section. Validation is strict (unknown keys, wrong types and out-of-range values
are errors naming the key) because a typo in a YAML key would otherwise silently fall back to a default
and produce a run that looks valid but is not the one the user asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from daft_core.methods import FINETUNED_METHODS, get_recipe

if TYPE_CHECKING:
    from daft_core.recipes import Recipe

DEFAULT_PARAMS = Path("params.yaml")
FINETUNE_METHODS = FINETUNED_METHODS  # the catalogue's fine-tuned methods (daft_core.methods)


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PipelineParams(_Strict):
    experiment: str = Field("daft", min_length=1)
    registered_model: str = Field("daft-digits", min_length=1)
    tracking: bool = True


class DataParams(_Strict):
    preset: Literal["digits", "imagefolder", "cifar10"] = "digits"
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    printed_per_class: int = Field(60, ge=1, le=10_000)
    root: str | None = None
    id_train: str | None = None
    id_val: str | None = None
    id_test: str | None = None
    ood: dict[str, str] = Field(default_factory=dict)
    extra_ood: dict[str, str] = Field(default_factory=dict)
    image_size: int = Field(64, ge=8, le=1024)
    grayscale: bool = False
    on_bad_image: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _fractions(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1 so training data is left")
        if self.preset == "imagefolder" and not (self.root or (self.id_train and self.id_test)):
            raise ValueError(
                "preset 'imagefolder' needs data.root (with id_train/ and id_test/) "
                "or both data.id_train and data.id_test"
            )
        if self.preset == "cifar10" and not self.root:
            raise ValueError("preset 'cifar10' needs data.root (the folder holding the dataset files)")
        return self


class ModelParams(_Strict):
    name: str = Field("efficientnet_lite0", min_length=1)
    weights: str | None = "imagenet"
    input_size: int = Field(64, ge=16, le=1024)


class ConvertParams(_Strict):
    stats: Literal["batch_mean", "population"] = "batch_mean"
    batch_size: int = Field(128, ge=1)


class ProbeParams(_Strict):
    num_cs: int = Field(50, ge=1, le=500)
    c_min: float = Field(1e-7, gt=0)
    c_max: float = Field(1e2, gt=0)
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _range(self) -> ProbeParams:
        if self.c_min > self.c_max:
            raise ValueError("c_min must be <= c_max")
        return self


class AugmentParams(_Strict):
    hflip: bool = False
    random_resized_crop: bool = True
    scale: tuple[float, float] = (0.7, 1.0)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError("scale must satisfy 0 < min <= max <= 1")
        return v


class MethodParams(_Strict):
    """One fine-tuning branch. `lr` sets both groups; `head_lr`/`backbone_lr` override per group."""

    start: Literal["pretrained", "bn_converted", "linear_probe"]
    lr: float | None = Field(None, ge=0)
    head_lr: float | None = Field(None, ge=0)
    backbone_lr: float | None = Field(None, ge=0)
    epochs: int | None = Field(None, ge=0, le=10_000)

    def with_lrs(
        self, lr: float | None = None, head_lr: float | None = None, backbone_lr: float | None = None
    ) -> MethodParams:
        """This entry with learning rates layered on top, by the same rule as the entry's own fields:
        `lr` sets both groups, then `head_lr` / `backbone_lr` each set one."""
        current = resolve_lrs(None, None, self.lr, self.head_lr, self.backbone_lr)
        h, b = resolve_lrs(*current, lr, head_lr, backbone_lr)
        return self.model_copy(update={"lr": None, "head_lr": h, "backbone_lr": b})


def resolve_lrs(
    head: float | None,
    backbone: float | None,
    lr: float | None = None,
    head_lr: float | None = None,
    backbone_lr: float | None = None,
) -> tuple[float | None, float | None]:
    """The one learning-rate rule: `lr` sets both groups, `head_lr` / `backbone_lr` override one group."""
    if lr is not None:
        head, backbone = lr, lr
    return (head_lr if head_lr is not None else head, backbone_lr if backbone_lr is not None else backbone)


class FinetuneParams(_Strict):
    epochs: int = Field(6, ge=0, le=10_000)
    batch_size: int = Field(64, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    # channels_last is ~20% faster for EfficientNet's depthwise convs on CPU too (measured), same accuracy.
    channels_last: Literal["auto", "on", "off"] = "on"
    augment: AugmentParams = AugmentParams()
    methods: dict[str, MethodParams] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _known(cls, v: dict[str, MethodParams]) -> dict[str, MethodParams]:
        unknown = sorted(set(v) - set(FINETUNE_METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {list(FINETUNE_METHODS)}")
        return v

    @field_validator("channels_last", mode="before")
    @classmethod
    def _yaml_11_bool(cls, v: Any) -> Any:
        """`dvc exp run -S` writes a bare `on`/`off`, which YAML 1.1 readers (PyYAML) load as a bool."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvaluateParams(_Strict):
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class Params(_Strict):
    pipeline: PipelineParams = PipelineParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    convert_bn: ConvertParams = ConvertParams()
    linear_probe: ProbeParams = ProbeParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()

    # The one translation from validated params to core objects (DVC step, Kubeflow, benchmark).
    def method(self, name: str) -> MethodParams:
        """The configured entry of `name`; ParamsError (naming the configured ones) when it is not there."""
        if name not in self.finetune.methods:
            raise ParamsError(
                f"method {name!r} is not configured under finetune.methods in params "
                f"(configured: {sorted(self.finetune.methods)})"
            )
        return self.finetune.methods[name]

    def recipe(self, name: str) -> Recipe:
        """The catalogue recipe of `name` with the learning rates params set for it."""
        m = self.method(name)
        head, backbone = resolve_lrs(None, None, m.lr, m.head_lr, m.backbone_lr)
        overrides = {k: v for k, v in (("head_lr", head), ("backbone_lr", backbone)) if v is not None}
        try:
            return get_recipe(name, **overrides)
        except ValueError as e:
            raise ParamsError(f"finetune.methods.{name}: {e}") from None

    def with_method_lrs(
        self,
        name: str,
        lr: float | None = None,
        head_lr: float | None = None,
        backbone_lr: float | None = None,
    ) -> Params:
        """These params with `name`'s learning rates replaced (a pipeline parameter or a sweep point)."""
        if lr is None and head_lr is None and backbone_lr is None:
            return self
        entry = self.method(name).with_lrs(lr, head_lr, backbone_lr)
        raw = self.model_dump(mode="json")
        raw["finetune"]["methods"][name] = entry.model_dump(mode="json")
        return params_from_dict(raw, f"finetune.methods.{name} (learning rates)")


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and its section)"
        lines.append(f"  {key}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""))
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted!r}: {p!r} is not a section")
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of `overrides` in the raw params tree (before validation)."""
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return tree


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`key.sub=value` strings (values parsed as YAML) into a dotted dict."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ParamsError(f"override {pair!r} must look like key.sub=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the project root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return params_from_dict(apply_overrides(raw, overrides), str(path))


def params_to_json(params: Params) -> str:
    return json.dumps(params.model_dump(mode="json"), sort_keys=True)
