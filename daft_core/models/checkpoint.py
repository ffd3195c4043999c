"""Checkpoint I/O: read weights safely, fit them onto a model, save and reload whole :class:`DaftModel`\\ s.

Everything is read with ``torch.load(weights_only=True)``: a checkpoint that would run code when
unpickled is refused, never executed. The core reads local files only; a ``scheme://`` path goes through
an opener registered with :func:`register_opener` (the pipeline registers ``s3`` in
``components.storage``), so the library itself needs no cloud SDK.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from daft_core.atomic import atomic_file
from daft_core.errors import CheckpointError
from daft_core.models.wrapper import DaftModel

__all__ = [
    "MOCO_PREFIX",
    "CheckpointError",
    "CheckpointFormat",
    "Fetcher",
    "apply_state_dict",
    "load_model",
    "load_state_dict_file",
    "register_opener",
    "save_model",
    "uri_scheme",
]

log = logging.getLogger(__name__)

MOCO_PREFIX = "module.encoder_q."
CheckpointFormat = Literal["auto", "plain", "moco"]
Fetcher = Callable[[str, Path], object]
"""``fetch(uri, dest)`` copies the object at ``uri`` into the local file ``dest`` (raising on failure)."""


# --------------------------------------------------------------------------------------------------
# URI openers: the only way a non-local path gets in
# --------------------------------------------------------------------------------------------------

_OPENERS: dict[str, Fetcher] = {}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def register_opener(scheme: str, fetch: Fetcher) -> None:
    """Let weights/checkpoint paths starting with ``<scheme>://`` be read via ``fetch(uri, local_file)``.

    Registering the same scheme again replaces the opener, so installers may run any number of times.
    """
    scheme = scheme.lower().removesuffix("://")
    if not _SCHEME.match(f"{scheme}://"):
        raise ValueError(f"not a URI scheme: {scheme!r}")
    _OPENERS[scheme] = fetch


def uri_scheme(path: str | os.PathLike[str]) -> str | None:
    """``"s3"`` for ``s3://bucket/key``; None for a local path (which never contains ``://`` up front)."""
    m = _SCHEME.match(os.fspath(path))
    return m.group(1).lower() if m else None


@contextlib.contextmanager
def _fetched(uri: str, scheme: str) -> Iterator[Path]:
    """A local temp copy of ``uri``, removed afterwards, so the safe local loader handles every source."""
    fetch = _OPENERS.get(scheme)
    if fetch is None:
        hint = (
            "call components.storage.install() (the pipeline steps do) to enable s3://"
            if scheme == "s3"
            else f"register one with daft_core.models.register_opener({scheme!r}, fetch)"
        )
        raise CheckpointError(
            f"cannot read {uri}: daft_core reads local files only and no opener is registered for "
            f"{scheme}:// URIs; {hint}"
        )
    with tempfile.TemporaryDirectory(prefix="daft-ckpt-") as tmp:
        local = Path(tmp) / "checkpoint.pt"
        try:
            fetch(uri, local)
        except CheckpointError:
            raise
        except Exception as e:  # any opener's failure becomes the one error type callers handle
            detail = str(e) or type(e).__name__
            raise CheckpointError(detail if uri in detail else f"cannot fetch {uri}: {detail}") from e
        yield local


# --------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# --------------------------------------------------------------------------------------------------


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
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        AttributeError,
    ) as e:
        # what torch's loader raises on bytes that are not a checkpoint (e.g. "pop from empty list")
        raise CheckpointError(f"cannot read {shown} as a torch checkpoint: {type(e).__name__}: {e}") from e


def _load_raw(path_or_uri: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of a local file or a URI (via its opener and a temp file)."""
    shown = os.fspath(path_or_uri)
    scheme = uri_scheme(shown)
    if scheme is None:
        return _torch_load_local(Path(shown), shown)
    with _fetched(shown, scheme) as local:
        return _torch_load_local(local, shown)


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


def load_state_dict_file(path_or_uri: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or URI, read with ``weights_only=True`` on CPU.

    Accepts a raw state dict or one wrapped under ``"state_dict"``/``"model"``; raises
    :class:`CheckpointError` for missing, unreadable or unsafe (code-running) files.
    """
    return _unwrap_state_dict(_load_raw(path_or_uri), os.fspath(path_or_uri))


# --------------------------------------------------------------------------------------------------
# Fitting a state dict onto a model
# --------------------------------------------------------------------------------------------------


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


def apply_state_dict(
    model: DaftModel,
    sd: dict[str, torch.Tensor],
    *,
    head_prefix: str,
    source: str,
    checkpoint_format: CheckpointFormat = "auto",
) -> None:
    """Load backbone weights strictly; load the head too when the checkpoint has one of the right shape.

    A pretrained classifier rarely matches the task's classes, so a mismatched head is logged and kept
    fresh rather than refused; a mismatched backbone is always an error.
    """
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
    """Write ``{"spec", "state_dict", "extra"}`` atomically, so a killed step never leaves half a file.

    Only tensors, the JSON-able spec and plain ``extra`` values are stored, so :func:`load_model` can
    read it back with ``weights_only=True``.
    """
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
    with atomic_file(path, "wb") as f:
        torch.save(payload, f)
    return path


def load_model(path_or_uri: str | os.PathLike[str]) -> DaftModel:
    """Rebuild a :func:`save_model` checkpoint (local or URI) from its spec, without pretrained weights.

    The checkpoint's ``extra`` dict is available as ``model.extra``.
    """
    # Imported here: the registry loads weights through this module, so a top-level import would cycle.
    from daft_core.models.registry import build_model

    shown = os.fspath(path_or_uri)
    obj = _load_raw(path_or_uri)
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
