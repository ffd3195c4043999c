"""The single source of hyper-parameters: params.yaml, validated on load.

Every step reads its own section. Validation is strict (unknown keys, wrong types and out-of-range values
are errors naming the key) because a typo in a YAML key would otherwise silently fall back to a default
and produce a run that looks valid but is not the one the user asked for. In the same spirit: integers
and booleans are strict (``epochs: true`` is not 1, ``"yes"`` / ``1`` are not booleans), every float must
be finite (``lr: .inf`` / ``.nan`` are refused), an empty params file is refused instead of meaning "all
defaults", and the YAML reader refuses aliases and files over :data:`MAX_PARAMS_BYTES` (params files never
need them; a "billion laughs" alias bomb would otherwise expand in memory and into the error message).
Values echoed in error messages are cut to :data:`MAX_ECHO_CHARS` characters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from daft_core.methods import FINETUNED_METHODS, get_method, get_recipe

if TYPE_CHECKING:
    from daft_core.recipes import Recipe

DEFAULT_PARAMS = Path("params.yaml")
FINETUNE_METHODS = FINETUNED_METHODS  # the catalogue's fine-tuned methods (daft_core.methods)
MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; refuse anything over 1 MiB before parsing it
MAX_ECHO_CHARS = 200  # an input value echoed in an error message is cut to this many characters
MAX_REPORTED_ERRORS = 20  # validation errors listed in one message (the rest are counted)


class ParamsError(ValueError):
    """params.yaml (or an override) is invalid; the message names the key."""


def _not_a_bool(v: Any) -> Any:
    """YAML `true` / `false` are not numbers (pydantic would otherwise read `lr: true` as 1.0)."""
    if isinstance(v, bool):
        raise ValueError(f"expected a number, got the boolean {str(v).lower()}")
    return v


# Strict integers: a bool, a float (3.0) or a string ("3") is not an int. Floats stay lax so `1e-3` (which
# PyYAML reads as a string) still parses, but a bool is refused and every float must be finite
# (`allow_inf_nan=False` in `_Strict`). Booleans are StrictBool: `"yes"` or `1` is not a bool.
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def _data_location(v: str) -> str:
    """A data folder: a local path, or ``s3://bucket/prefix`` (prepare_data downloads it once)."""
    m = _SCHEME.match(v)
    if m is None:
        return v
    if m.group(1) != "s3":
        raise ValueError(f"{m.group(1)}:// is not supported; give a local path or an s3://bucket/prefix URI")
    if not v[len("s3://") :].partition("/")[0]:
        raise ValueError("malformed S3 URI; expected s3://bucket/prefix")
    return v


# Where data is read from (data.root, data.id_*, data.ood.*, data.extra_ood.*): a path or an s3:// URI.
DataLocation = Annotated[str, AfterValidator(_data_location)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PipelineParams(_Strict):
    experiment: str = Field("daft", min_length=1)
    registered_model: str = Field("daft-digits", min_length=1)
    tracking: StrictBool = True


class DataParams(_Strict):
    preset: Literal["digits", "imagefolder", "cifar10"] = "digits"
    seed: Int = Field(0, ge=0)
    val_fraction: Float = Field(0.2, gt=0, lt=1)
    test_fraction: Float = Field(0.2, gt=0, lt=1)
    printed_per_class: Int = Field(60, ge=1, le=10_000)
    # Each data location: a local path or s3://bucket/prefix (downloaded once by prepare_data).
    root: DataLocation | None = None
    id_train: DataLocation | None = None
    id_val: DataLocation | None = None
    id_test: DataLocation | None = None
    ood: dict[str, DataLocation] = Field(default_factory=dict)
    extra_ood: dict[str, DataLocation] = Field(default_factory=dict)
    image_size: Int = Field(64, ge=8, le=1024)
    grayscale: StrictBool = False
    on_bad_image: Literal["error", "skip"] = "error"
    # Image folders: a symlink (file or folder) that resolves outside the data folder is refused unless this
    # is true; links inside it are always fine.
    follow_symlinks: StrictBool = False
    # Image folders: an image with more pixels than this (width x height, read from the header before
    # decoding) is an error naming the file; also PIL's decompression-bomb limit while reading.
    max_pixels: Int = Field(40_000_000, ge=1, le=2_000_000_000)

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
    input_size: Int = Field(64, ge=16, le=1024)


class ConvertParams(_Strict):
    stats: Literal["batch_mean", "population"] = "batch_mean"
    batch_size: Int = Field(128, ge=1)


class ProbeParams(_Strict):
    num_cs: Int = Field(50, ge=1, le=500)
    c_min: Float = Field(1e-7, gt=0)
    c_max: Float = Field(1e2, gt=0)
    batch_size: Int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the paper's one mean / one std over all train features (daft_core.probe.NORMALIZE_MODES)
    normalize: Literal["scalar", "per_feature", "none"] = "scalar"
    max_iter: Int = Field(200, ge=1, le=100_000)  # L-BFGS iterations per C; the official code's 200

    @model_validator(mode="after")
    def _range(self) -> ProbeParams:
        if self.c_min > self.c_max:
            raise ValueError("c_min must be <= c_max")
        return self


class AugmentParams(_Strict):
    hflip: StrictBool = False
    random_resized_crop: StrictBool = True
    scale: tuple[Float, Float] = (0.7, 1.0)

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError("scale must satisfy 0 < min <= max <= 1")
        return v


class MethodParams(_Strict):
    """One fine-tuning branch. `lr` sets both groups; `head_lr`/`backbone_lr` override per group."""

    start: Literal["pretrained", "bn_converted", "linear_probe"]
    lr: Float | None = Field(None, ge=0)
    head_lr: Float | None = Field(None, ge=0)
    backbone_lr: Float | None = Field(None, ge=0)
    # 0 epochs would publish the starting model as "fine-tuned": at least one
    epochs: Int | None = Field(None, ge=1, le=10_000)
    # A run whose lrs cannot be the published method (DAFT with head lr <= backbone lr, ...) is refused
    # unless named here; the name travels with its model and metrics, and the report marks the row.
    variant: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,39}$")] | None = None

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


def _default_lrs(name: str) -> tuple[float, float]:
    recipe = get_method(name).recipe
    return recipe.head_lr, recipe.backbone_lr


class FinetuneParams(_Strict):
    epochs: Int = Field(6, ge=1, le=10_000)  # 0 would publish the starting model as "fine-tuned"
    batch_size: Int = Field(64, ge=1)
    momentum: Float = Field(0.9, ge=0, lt=1)
    weight_decay: Float = Field(0.0, ge=0)
    seed: Int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: StrictBool = False
    # channels_last is ~20% faster for EfficientNet's depthwise convs on CPU too (measured), same accuracy.
    channels_last: Literal["auto", "on", "off"] = "on"
    # The paper's schedule: cosine annealing stepped once per epoch (the official code's CosineAnnealingLR);
    # "cosine_step" decays per optimisation step.
    schedule: Literal["cosine_epoch", "cosine_step"] = "cosine_epoch"
    # Data-parallel runs (torchrun): BN batch statistics per rank (the paper's per-GPU 64) unless true.
    sync_bn: StrictBool = False
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
    batch_size: Int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


# WiSE-FT's default α grid (daft_core.wise_ft.DEFAULT_ALPHAS; not imported here: params must not load torch).
WISE_FT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


class WiseFtParams(_Strict):
    """WiSE-FT (components.wise_ft): each listed method's fine-tuned weights mixed with its start's, at the
    α of `alphas` best on ID val (ties: the smaller). Off by default (no methods); each must be configured
    under finetune.methods (checked in params_from_dict)."""

    methods: list[str] = Field(default_factory=list)
    alphas: list[Float] = Field(default_factory=lambda: list(WISE_FT_ALPHAS), min_length=1)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - set(FINETUNE_METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; valid: {list(FINETUNE_METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(
                f"every alpha must lie in [0, 1] (0: the start model, 1: the fine-tuned one), got {bad}"
            )
        return v


class Params(_Strict):
    pipeline: PipelineParams = PipelineParams()
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    convert_bn: ConvertParams = ConvertParams()
    linear_probe: ProbeParams = ProbeParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    wise_ft: WiseFtParams = WiseFtParams()

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


def without_tracking(params: Params) -> Params:
    """``params`` with MLflow tracking off (ranks other than 0 of a data-parallel run)."""
    return params.model_copy(update={"pipeline": params.pipeline.model_copy(update={"tracking": False})})


def _clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` cut to `limit` characters, saying how much was left out (echoed input stays readable)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _echo(value: Any) -> str:
    """repr of an input value for an error message, bounded in size even for a huge nested value."""
    if isinstance(value, (dict, list, tuple)) and len(value) > MAX_ECHO_CHARS:
        return f"a {type(value).__name__} of {len(value)} items"
    return _clip(_one_line(repr(value)))


def _one_line(text: str) -> str:
    """Newlines (PyYAML's error marks) folded so the step's `error:` line stays one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _format_error(err: ValidationError, source: str) -> str:
    """One line: `invalid parameters in <source>: <key>: <what> (got <value>); <key>: ...`."""
    errors = err.errors()
    lines = []
    for e in errors[:MAX_REPORTED_ERRORS]:
        key = _clip(".".join(str(p) for p in e["loc"]))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and its section)"
        got = f" (got {_echo(e['input'])})" if e["type"] != "extra_forbidden" else ""
        lines.append(f"{key}: {_clip(_one_line(msg))}{got}")
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    return f"invalid parameters in {_clip(source)}: " + "; ".join(lines)


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases (`*name`): params never need them, and nested aliases
    (a "billion laughs" document) expand exponentially in memory and in any message that echoes them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"found the alias *{_clip(str(event.anchor), 40)}; params files may not use YAML "
                "anchors/aliases (write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _safe_yaml(text: Any) -> Any:
    """YAML from a string or an open file (whose name then appears in the error marks)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no arbitrary objects


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {_clip(dotted)!r}: {_clip(p)!r} is not a section")
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
        if len(raw) > MAX_PARAMS_BYTES:
            raise ParamsError(f"override {_clip(key.strip())!r}: value longer than {MAX_PARAMS_BYTES} bytes")
        try:
            out[key.strip()] = _safe_yaml(raw)
        except yaml.YAMLError as err:
            raise ParamsError(
                f"override {_clip(pair)!r}: not a valid YAML value: {_clip(_one_line(err))}"
            ) from None
    return out


def params_from_dict(raw: dict[str, Any], source: str = "params") -> Params:
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None
    check_published(params.finetune.methods, source)
    check_wise_ft(params, source)
    return params


def check_wise_ft(params: Params, source: str = "params") -> None:
    """Every wise_ft method must be a configured branch: WiSE-FT mixes that branch's fine-tuned model."""
    missing = [m for m in params.wise_ft.methods if m not in params.finetune.methods]
    if missing:
        raise ParamsError(
            f"invalid parameters in {source}: wise_ft.methods: {missing} not configured under "
            f"finetune.methods (configured: {sorted(params.finetune.methods)}); add the branch there or "
            "drop it from wise_ft"
        )


def check_published(methods: dict[str, MethodParams], source: str = "params") -> None:
    """Each branch is its method as published, or is named as a variant (`variant:`); a run that is not
    the paper's method must not be reported under the paper's name."""
    for name, entry in methods.items():
        head, backbone = resolve_lrs(*_default_lrs(name), entry.lr, entry.head_lr, entry.backbone_lr)
        reason = get_method(name).published_violation(head, backbone)
        if reason is not None and entry.variant is None:
            raise ParamsError(
                f"invalid parameters in {source}: finetune.methods.{name}: {reason}. Change the learning "
                f"rates, or run it as a named variant: add `variant: <name>` to finetune.methods.{name}"
            )


def load_params(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Params:
    """Read, apply dotted overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found; run from the project root or pass --params PATH")
    size = path.stat().st_size
    if size > MAX_PARAMS_BYTES:
        raise ParamsError(
            f"params file {path} is {size} bytes, over the {MAX_PARAMS_BYTES}-byte limit for a params file; "
            "is it the right file? (params.yaml is a few KB)"
        )
    try:
        with path.open(encoding="utf-8") as f:
            raw = _safe_yaml(f)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path} is not valid YAML: {_clip(_one_line(err), 4 * MAX_ECHO_CHARS)}") from None
    expected = (
        f"expected a mapping of sections ({', '.join(Params.model_fields)}) like the project's params.yaml"
    )
    if raw is None or raw == {}:
        raise ParamsError(
            f"params file {path} is empty (or holds only comments); {expected}: an empty file would silently "
            "run every default"
        )
    if not isinstance(raw, dict):
        raise ParamsError(
            f"params file {path} must hold a mapping of sections, got {type(raw).__name__}; {expected}"
        )
    return params_from_dict(apply_overrides(raw, overrides), str(path))


def params_to_json(params: Params) -> str:
    return json.dumps(params.model_dump(mode="json"), sort_keys=True)
