"""Evaluation: accuracy, calibration and feature distortion on ID and OOD sets.

DAFT's claim is that fine-tuning with converted BN and a good head init distorts pretrained features
less, which keeps OOD accuracy. So besides accuracy/ECE/NLL per set, :func:`evaluate` measures how
far the fine-tuned model's penultimate features (and parameters) moved from the pretrained reference,
in the same pass over each set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from daft_core.devices import module_device, resolve_device

__all__ = ["evaluate", "expected_calibration_error", "parameter_distance"]

log = logging.getLogger(__name__)


class ImageSetLike(Protocol):
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def _bin_index(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bins (lo, hi] over [0, 1]; a confidence of exactly 0 goes to the first bin."""
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)[1:-1]
    return torch.bucketize(conf.to(torch.float64), inner, right=False)


def _ece_from_bins(count: torch.Tensor, conf_sum: torch.Tensor, correct_sum: torch.Tensor) -> float:
    n = float(count.sum())
    if n == 0:
        raise ValueError("ECE of an empty set is undefined")
    return float((conf_sum - correct_sum).abs().sum() / n)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, equal-width bins over the max softmax probability."""
    if probs.dim() != 2 or labels.dim() != 1 or probs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"need probs (N, C) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    if probs.shape[0] == 0:
        raise ValueError("ECE of an empty set is undefined")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).to(torch.float64)
    idx = _bin_index(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device).index_add_(
        0, idx, torch.ones_like(correct)
    )
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf.to(torch.float64))
    correct_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    return _ece_from_bins(count, conf_sum, correct_sum)


# --------------------------------------------------------------------------------------------------
# Parameter distance
# --------------------------------------------------------------------------------------------------


def _rel(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _head_names(model: nn.Module) -> set[str]:
    """Parameter names of the model's replaceable ``head`` (none when it has no head module)."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        return set()
    return {f"head.{n}" for n, _ in head.named_parameters()}


def _summary(sq: float, ref_sq: float, n: int) -> dict[str, Any]:
    return {"l2": math.sqrt(sq), "relative": _rel(math.sqrt(sq), math.sqrt(ref_sq)), "num_params": n}


@torch.no_grad()
def parameter_distance(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """L2 and relative L2 distance (||p - p_ref|| / ||p_ref||) per parameter tensor, per module, and for
    the backbone and the head separately.

    ``total`` covers the backbone only (every parameter outside ``model.head``): the question is how far
    fine-tuning moved the *pretrained features*, and a head trained from scratch (a probe's, or FT's random
    one) would otherwise dominate it (an untouched backbone with a fitted head is not "distorted").
    ``head`` is the head's distance (None when no head parameter is comparable). Only parameters with the
    same name and shape are compared: a replaced head with another class count is listed under ``skipped``.
    """
    ref = dict(reference.named_parameters())
    own = dict(model.named_parameters())
    head_names = _head_names(model)
    per_tensor: dict[str, dict[str, Any]] = {}
    per_module: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    groups = {"backbone": [0.0, 0.0, 0], "head": [0.0, 0.0, 0]}  # [diff_sq, ref_sq, num_params]
    for name, p in own.items():
        q = ref.get(name)
        if q is None or q.shape != p.shape:
            skipped.append(name)
            continue
        diff_sq = float((p.detach().double() - q.detach().double().to(p.device)).pow(2).sum())
        ref_sq = float(q.detach().double().pow(2).sum())
        per_tensor[name] = {"l2": math.sqrt(diff_sq), "relative": _rel(math.sqrt(diff_sq), math.sqrt(ref_sq))}
        module = name.rsplit(".", 1)[0] if "." in name else ""
        m = per_module.setdefault(module, {"_sq": 0.0, "_ref_sq": 0.0, "num_params": 0})
        m["_sq"] += diff_sq
        m["_ref_sq"] += ref_sq
        m["num_params"] += p.numel()
        g = groups["head" if name in head_names else "backbone"]
        g[0] += diff_sq
        g[1] += ref_sq
        g[2] += p.numel()
    skipped += [n for n in ref if n not in own]
    modules = {k: _summary(v["_sq"], v["_ref_sq"], v["num_params"]) for k, v in per_module.items()}
    head = groups["head"]
    return {
        "total": _summary(*groups["backbone"]),
        "head": _summary(*head) if head[2] else None,
        "per_module": modules,
        "per_tensor": per_tensor,
        "skipped": sorted(set(skipped)),
    }


# --------------------------------------------------------------------------------------------------
# Evaluation pass
# --------------------------------------------------------------------------------------------------


def _batches(
    ds: ImageSetLike, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential batches moved to ``device`` (uint8 stays uint8: the model preprocesses)."""
    images, labels = torch.as_tensor(ds.images), torch.as_tensor(ds.labels)
    for start in range(0, images.shape[0], batch_size):
        yield (
            images[start : start + batch_size].to(device, non_blocking=True),
            labels[start : start + batch_size].to(device, non_blocking=True),
        )


def _num_classes(model: nn.Module) -> int | None:
    head = getattr(model, "head", None)
    return head.out_features if isinstance(head, nn.Linear) else None


def _class_names_for(ds: ImageSetLike, sets: Mapping[str, ImageSetLike], n: int | None) -> list[str] | None:
    """Names for the model's classes: the set's own if they cover the head, else another set's (ID) list."""
    own = list(getattr(ds, "class_names", []) or [])
    if n is None or len(own) == n:
        return own or None
    for other in sets.values():
        names = list(getattr(other, "class_names", []) or [])
        if len(names) == n:
            return names
    return None


def _validate(name: str, ds: ImageSetLike, num_classes: int | None) -> None:
    n = int(ds.labels.shape[0]) if hasattr(ds, "labels") else 0
    if n == 0 or int(ds.images.shape[0]) == 0:
        raise ValueError(f"evaluation set {name!r} is empty")
    if int(ds.images.shape[0]) != n:
        raise ValueError(f"evaluation set {name!r}: {ds.images.shape[0]} images but {n} labels")
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise ValueError(
            f"evaluation set {name!r} has labels in [{lo}, {hi}], outside the model head's "
            f"{num_classes} classes [0, {num_classes - 1 if num_classes else '?'}]"
        )


def _progress(it: Iterator[Any], total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield from it
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # plain log lines when tqdm is absent
        for i, item in enumerate(it):
            log.info("%s: batch %d/%d", desc, i + 1, total)
            yield item
        return
    yield from tqdm(it, total=total, desc=desc, leave=False)


@torch.no_grad()
def _evaluate_set(
    name: str,
    ds: ImageSetLike,
    model: nn.Module,
    reference: nn.Module | None,
    class_names: Sequence[str] | None,
    num_classes: int | None,
    *,
    batch_size: int,
    device: torch.device,
    n_bins: int,
    progress: bool,
) -> dict[str, Any]:
    n_total = int(ds.labels.shape[0])
    correct = 0
    nll_sum = 0.0
    bins_count = torch.zeros(n_bins, dtype=torch.float64)
    bins_conf = torch.zeros(n_bins, dtype=torch.float64)
    bins_correct = torch.zeros(n_bins, dtype=torch.float64)
    class_count: torch.Tensor | None = None
    class_correct: torch.Tensor | None = None
    confusion: torch.Tensor | None = None  # (true, predicted) counts, flattened
    l2s: list[torch.Tensor] = []
    rel_l2s: list[torch.Tensor] = []
    cos_sum = 0.0
    n_batches = math.ceil(n_total / batch_size)
    for x, y in _progress(_batches(ds, batch_size, device), n_batches, f"eval {name}", progress):
        feats = model.features(x)
        logits = model.head(feats).double()
        if num_classes is None:
            num_classes = logits.shape[1]
            _validate(name, ds, num_classes)
        if class_count is None:
            class_count = torch.zeros(num_classes, dtype=torch.float64)
            class_correct = torch.zeros(num_classes, dtype=torch.float64)
            confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
        y = y.long()
        probs = logits.softmax(dim=1)
        conf, pred = probs.max(dim=1)
        hit = (pred == y).double()
        correct += int(hit.sum())
        nll_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        idx = _bin_index(conf, n_bins).cpu()
        bins_count.index_add_(0, idx, torch.ones(idx.shape[0], dtype=torch.float64))
        bins_conf.index_add_(0, idx, conf.cpu())
        bins_correct.index_add_(0, idx, hit.cpu())
        class_count.index_add_(0, y.cpu(), torch.ones(y.shape[0], dtype=torch.float64))
        class_correct.index_add_(0, y.cpu(), hit.cpu())
        assert confusion is not None
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=confusion.numel())
        if reference is not None:
            f = feats.flatten(1).double()
            r = reference.features(x).flatten(1).double()
            if f.shape != r.shape:
                raise ValueError(
                    f"feature shapes differ: model {tuple(f.shape)} vs reference {tuple(r.shape)}"
                )
            d = (f - r).norm(dim=1)
            l2s.append(d.cpu())
            rel_l2s.append((d / r.norm(dim=1).clamp_min(1e-12)).cpu())
            cos_sum += float(F.cosine_similarity(f, r, dim=1, eps=1e-12).sum())
    assert class_count is not None and class_correct is not None and confusion is not None
    names = list(class_names) if class_names else [str(i) for i in range(num_classes or 0)]
    labels = [names[c] if c < len(names) else str(c) for c in range(class_count.shape[0])]
    per_class = {
        label: (float(class_correct[c] / class_count[c]) if class_count[c] > 0 else None)
        for c, label in enumerate(labels)
    }
    out: dict[str, Any] = {
        "n": n_total,
        "accuracy": correct / n_total,
        "per_class_accuracy": per_class,
        "confusion_matrix": {"classes": labels, "matrix": confusion.view(len(labels), -1).tolist()},
        "ece": _ece_from_bins(bins_count, bins_conf, bins_correct),
        "nll": nll_sum / n_total,
    }
    if reference is not None:
        l2 = torch.cat(l2s)
        out["feature_distortion"] = {
            "l2_mean": float(l2.mean()),
            "l2_median": float(l2.median()),
            "relative_l2_mean": float(torch.cat(rel_l2s).mean()),
            "cosine_mean": cos_sum / n_total,
        }
    return out


def evaluate(
    model: nn.Module,
    sets: Mapping[str, ImageSetLike],
    reference: nn.Module | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    n_bins: int = 15,
    progress: bool = False,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on each named set, plus distortion against ``reference`` (the pretrained model).

    Returns ``{"sets": {name: {"n", "accuracy", "per_class_accuracy", "confusion_matrix", "ece", "nll"[,
    "feature_distortion": {"l2_mean", "l2_median", "relative_l2_mean", "cosine_mean"}]}},
    "parameter_distance": {...} | None}``.
    ``per_class_accuracy`` maps every class of the head to its accuracy (None when absent from the set);
    names come from ``class_names``, else the set's own (or another set's) list matching the head size.
    ``confusion_matrix`` is ``{"classes": [name, ...], "matrix": [[int]]}``: ``matrix[i][j]`` counts the
    set's images of class ``classes[i]`` predicted as ``classes[j]`` (every class of the head, in its order).
    Models only need ``features(x)`` and ``head``; both run in eval mode, and every submodule's
    train/eval flag (and the device) is restored afterwards.
    """
    if not sets:
        raise ValueError("no evaluation sets given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    num_classes = _num_classes(model)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class head")
    for name, ds in sets.items():
        _validate(name, ds, num_classes)

    dev = resolve_device(device) if device is not None else module_device(model)
    modules = [m for m in (model, reference) if m is not None]
    saved = [({m: m.training for m in mod.modules()}, module_device(mod)) for mod in modules]
    try:
        for mod in modules:
            mod.to(dev).eval()
        results = {
            name: _evaluate_set(
                name,
                ds,
                model,
                reference,
                class_names if class_names is not None else _class_names_for(ds, sets, num_classes),
                num_classes,
                batch_size=batch_size,
                device=dev,
                n_bins=n_bins,
                progress=progress,
            )
            for name, ds in sets.items()
        }
        dist = parameter_distance(model, reference) if reference is not None else None
    finally:
        for mod, (flags, orig) in zip(modules, saved, strict=True):
            mod.to(orig)
            for m, flag in flags.items():
                m.training = flag
    for name, r in results.items():
        log.info(
            "eval %s: n=%d accuracy=%.4f ece=%.4f nll=%.4f", name, r["n"], r["accuracy"], r["ece"], r["nll"]
        )
    return {"sets": results, "parameter_distance": dist}
