"""The platform file (``--platform platform.yaml``), validated like params.yaml.

Strict (pydantic, ``extra="forbid"``): an unknown or misplaced key (``gpu.tolerations``,
``retries.max_retries``), a wrong type or an unknown step name is one error line that names the key and,
for an unknown key, lists the keys allowed there. docs/kubeflow.md describes every section.

:func:`validate_platform` returns the validated file as a plain mapping (only the keys the file sets, with
durations turned into seconds), which ``pipelines.cli.build_options`` maps onto ``PipelineOptions``.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from daft_core.methods import FINETUNED_METHODS
from pipelines.pipeline import (
    SCRATCH_MOUNT,
    STEPS,
    TARGETS,
    check_data_pvc,
    grid_points,
)

DATA_PVC_MOUNT = "/data"  # `data.mount_path` default
Step = Literal[STEPS]  # type: ignore[valid-type]
StepOrDefault = Literal[("default", *STEPS)]  # type: ignore[valid-type]
Target = Literal[(*TARGETS, *STEPS)]  # type: ignore[valid-type]
_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class PlatformError(ValueError):
    """The platform file is invalid; the message (one line) names the key."""


def _quantity(v: Any) -> Any:
    """A Kubernetes quantity written as a number (``cpu: 2``) is the same as the string ``"2"``."""
    if isinstance(v, bool):
        raise ValueError("expected a quantity like 2, 500m or 4Gi, got a boolean")
    return str(v) if isinstance(v, int | float) else v


Quantity = Annotated[str, BeforeValidator(_quantity), Field(min_length=1, pattern=r"^[0-9.]+[A-Za-z]*$")]


def duration_seconds(v: Any) -> int:
    """``12h``, ``90m``, ``1h30m``, ``2d``, ``45s`` or a whole number of seconds, as seconds (> 0)."""
    if isinstance(v, bool):
        raise ValueError("expected a duration like 12h, 90m or 3600, got a boolean")
    if isinstance(v, int):
        seconds = v
    elif isinstance(v, str) and v.strip() and (m := _DURATION.match(v.strip().lower())):
        seconds = sum(int(n) * s for n, s in zip(m.groups(), _UNITS.values(), strict=True) if n)
    else:
        raise ValueError(f"expected a duration like 12h, 90m, 1h30m or a number of seconds, got {v!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0 seconds, got {v!r}")
    return seconds


def _kfp_duration(v: Any) -> Any:
    """A retry back-off as KFP reads it (``30s``, ``10m``, ``1h``): checked here, passed on as written."""
    from kfp.dsl.structures import convert_duration_to_seconds

    if isinstance(v, int) and not isinstance(v, bool):
        v = f"{v}s"
    try:
        convert_duration_to_seconds(str(v))
    except (ValueError, IndexError, TypeError):
        raise ValueError(f"expected a duration like 30s, 10m or 1h, got {v!r}") from None
    return v


Seconds = Annotated[int, BeforeValidator(duration_seconds)]
KfpDuration = Annotated[str, BeforeValidator(_kfp_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Resources(_Strict):
    cpu: Quantity | None = None
    memory: Quantity | None = None
    cpu_limit: Quantity | None = None
    memory_limit: Quantity | None = None


class Gpu(_Strict):
    enabled: StrictBool = True
    type: str | None = Field(None, min_length=1)  # set_accelerator_type
    count: int | None = Field(None, ge=0)  # set_accelerator_limit; 0: no GPU
    steps: list[Step] | None = None  # the GPU steps (default finetune, linear_probe)
    node_selector: dict[str, str] = Field(default_factory=dict)  # on the GPU steps
    image_has_cuda: StrictBool | None = None  # None: read from the image tag (`cpu` / `cuda`)


class Toleration(_Strict):
    """kubernetes.add_toleration: a toleration of the pod spec."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("operator Exists takes no value")
        if self.value is not None and self.key is None:
            raise ValueError("a value needs a key")
        if self.key is None and self.operator != "Exists":
            raise ValueError("without a key, the operator must be Exists (tolerate every taint)")
        return self


class Retries(_Strict):
    count: int | None = Field(None, ge=0)
    backoff: KfpDuration | None = None
    factor: float | None = Field(None, ge=1)
    max_backoff: KfpDuration | None = None


class Data(_Strict):
    """The user's data on a PVC, mounted on the prepare_data task."""

    pvc: str = Field(min_length=1)
    mount_path: str = DATA_PVC_MOUNT

    @model_validator(mode="after")
    def _check(self) -> Data:
        check_data_pvc({"name": self.pvc, "mount_path": self.mount_path})
        return self


class Scratch(_Strict):
    """A scratch volume for the step's temporary files (TMPDIR, DAFT_WORKSPACE)."""

    size: Quantity  # emptyDir sizeLimit, or the ephemeral PVC's size
    mount_path: str = SCRATCH_MOUNT
    storage_class: str | None = Field(None, min_length=1)  # set: a generic ephemeral volume (PVC)

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") == "":
            raise ValueError(f"must be an absolute path other than /, got {v!r}")
        return v


class Finetune(_Strict):
    """How finetune runs: in the task's pod (``pod``) or as a distributed Kubeflow Trainer v2 TrainJob of
    `nodes` x `gpus_per_node` (``trainjob``, pipelines/trainjob.py; docs/kubeflow.md)."""

    launcher: Literal["pod", "trainjob"] = "pod"
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    runtime: str = Field("torch-distributed", min_length=1)  # a ClusterTrainingRuntime
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    image: str | None = Field(None, min_length=1)  # default: the pipeline's image
    resources: Resources | None = None  # per node (the GPUs come from gpus_per_node)
    gpu_resource: str = Field("nvidia.com/gpu", min_length=1)
    results_uri: str | None = Field(None, pattern=r"^s3://[^/\s]+(/\S*)?$")  # required for trainjob
    namespace: str | None = Field(None, min_length=1)  # default: the launcher pod's
    timeout: Seconds | None = None  # the launcher's wait (default 24h)
    poll_interval: Seconds | None = None  # default 30s
    env: dict[str, str] = Field(default_factory=dict)  # e.g. NCCL_DEBUG: INFO

    @model_validator(mode="after")
    def _check(self) -> Finetune:
        from pipelines.trainjob import TrainJobConfig

        TrainJobConfig(**self.model_dump(exclude_none=True))  # ValueError naming the key
        return self


class Platform(_Strict):
    resources: dict[StepOrDefault, Resources] | None = None
    gpu: Gpu | None = None
    secrets: dict[str, dict[str, str]] | None = None  # secret -> {secret key: environment variable}
    retries: Retries | None = None
    caching: StrictBool | None = None
    sweep: dict[str, Any] | None = None  # method -> lrs, {head_lr: [...], backbone_lr: [...]} or points
    sweep_parallelism: int | None = Field(None, ge=1)
    node_selector: dict[Target, dict[str, str]] | None = None  # target -> {label: value}
    tolerations: dict[Target, list[Toleration]] | None = None  # target -> tolerations
    image_pull_secrets: list[str] | None = None
    timeouts: dict[StepOrDefault, Seconds] | None = None  # step -> seconds (the pod's deadline)
    scratch: dict[StepOrDefault, Scratch] | None = None
    data: Data | None = None
    # s3://bucket/prefix: finetune's resumable checkpoint across retries (DAFT_RESUME_URI on its tasks)
    resume_uri: str | None = Field(None, pattern=r"^s3://[^/\s]+(/\S*)?$")
    finetune: Finetune | None = None  # launcher: pod (default) | trainjob (distributed, Kubeflow Trainer)

    @field_validator("sweep")
    @classmethod
    def _grids(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for method, spec in (v or {}).items():
            if method not in FINETUNED_METHODS:
                raise ValueError(f"unknown method {method!r}; swept methods: {list(FINETUNED_METHODS)}")
            # malformed grids only: whether a point is the published method depends on params' variant
            grid_points(method, spec, published=False)
        return v


def validate_platform(raw: Any, source: str) -> dict[str, Any]:
    """The validated platform file (only what it sets); PlatformError (one line, naming the key) if not."""
    if not isinstance(raw, dict):
        raise PlatformError(f"{source} must hold a mapping of sections ({', '.join(Platform.model_fields)})")
    try:
        return Platform.model_validate(raw).model_dump(exclude_unset=True)
    except ValidationError as err:
        raise PlatformError(f"{source}: {format_errors(err)}") from None


def format_errors(err: ValidationError, limit: int = 5) -> str:
    lines = []
    for e in err.errors()[:limit]:
        loc = [str(p) for p in e["loc"] if p != "[key]"]
        where = ".".join(loc) or "(file)"
        kind = e["type"]
        if kind == "extra_forbidden":
            known = _known_keys(e["loc"])
            msg = "unknown key (check its spelling and its section" + (
                f"; known here: {', '.join(known)})" if known else ")"
            )
        elif kind == "missing":
            msg = "required"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"must be a mapping (got {_echo(e['input'])})"
        else:
            text = str(e["msg"]).removeprefix("Value error, ")
            msg = f"{text} (got {_echo(e['input'])})" if "got" not in text else text
        lines.append(f"{where}: {msg}")
    if len(err.errors()) > limit:
        lines.append(f"... and {len(err.errors()) - limit} more errors")
    return "; ".join(lines)


def _echo(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:80] + "..."


def _known_keys(loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed where `loc`'s last part sits (walking the schema), or None."""
    ann: Any = Platform
    for part in loc[:-1]:
        ann = _unwrap(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            field = ann.model_fields.get(str(part))
            if field is None:
                return None
            ann = field.annotation
        elif origin is dict:
            ann = typing.get_args(ann)[1]
        elif origin is list:
            ann = typing.get_args(ann)[0]
        else:
            return None
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return sorted(ann.model_fields)
    return None


def _unwrap(ann: Any) -> Any:
    """`X | None` -> X; Annotated[X, ...] -> X."""
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann
