"""Penultimate features, extracted once per split so the whole C sweep never touches the backbone again."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from daft_core.devices import module_device, resolve_device

__all__ = ["extract_features", "maybe_tqdm", "split_batch"]


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept a bare tensor or an ``(x, y, ...)`` sequence, as ``iterate_batches`` yields."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batch inputs must be torch tensors, got {type(x).__name__}")
        return x, (torch.as_tensor(y) if y is not None else None)
    raise TypeError(f"batches must be tensors or (x, y) pairs, got {type(batch).__name__}")


def maybe_tqdm(total: int | None, desc: str, iterable: Iterable[Any] | None = None) -> Any:
    """A tqdm bar that shows only on a terminal (``disable=None``); None when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a project dependency, but the core must not need it
        return None
    return tqdm(iterable, total=total, desc=desc, disable=None, leave=False)


def extract_features(
    model: nn.Module,
    batches: Iterable[Any],
    device: torch.device | str | None = None,
    *,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``model.features`` over ``batches`` in eval mode; return float32 CPU features and labels.

    ``batches`` yields tensors or ``(x, y)`` pairs (labels in all batches or none). ``device`` defaults
    to the model's own, so a caller that already placed the model need not repeat itself. Every
    submodule's train/eval flag is restored afterwards (not just the root's), so a fine-tuning loop with
    frozen BN layers is left untouched. ``progress`` shows a tqdm bar only when stderr is a terminal.
    Returns ``(features (N, D) float32, labels (N,) int64 or None)``.
    """
    if not callable(getattr(model, "features", None)):
        raise TypeError("model must expose features(x) -> (N, D) penultimate features (see DaftModel)")
    dev = resolve_device(device) if device is not None else module_device(model)
    modes = [(m, m.training) for m in model.modules()]
    it: Iterable[Any] = batches
    if progress:
        bar = maybe_tqdm(None, "features", iterable=batches)
        it = bar if bar is not None else batches
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    n_labelled = n_batches = 0
    model.eval()
    try:
        with torch.inference_mode():
            for batch in it:
                x, y = split_batch(batch)
                f = model.features(x.to(dev, non_blocking=True))
                if f.ndim != 2:
                    f = f.flatten(1)
                feats.append(f.float().cpu())
                n_batches += 1
                if y is not None:
                    n_labelled += 1
                    labels.append(y.reshape(-1).to("cpu", torch.int64))
    finally:
        for m, was_training in modes:
            m.training = was_training
    return _concat(feats, labels, n_batches, n_labelled)


def _concat(
    feats: list[torch.Tensor], labels: list[torch.Tensor], n_batches: int, n_labelled: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Join the batches, refusing a partial or mismatched label set (it would misalign rows silently)."""
    if n_batches == 0:
        raise ValueError("extract_features got no batches: the dataset or loader is empty")
    if n_labelled not in (0, n_batches):
        raise ValueError(
            f"{n_labelled} of {n_batches} batches carried labels: pass all (x, y) pairs or all bare tensors"
        )
    out = torch.cat(feats)
    lab = torch.cat(labels) if n_labelled else None
    if lab is not None and lab.shape[0] != out.shape[0]:
        raise ValueError(f"got {lab.shape[0]} labels for {out.shape[0]} feature rows: check the batches")
    return out, lab
