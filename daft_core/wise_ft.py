"""WiSE-FT: weight-space ensembling of a fine-tuned model with the model it started from.

Wortsman et al. 2022 ("Robust fine-tuning of zero-shot models") interpolate the weights of a zero-shot
model and its fine-tuned version, θ(α) = (1 - α)·θ_start + α·θ_ft, and find that a mixing coefficient
below 1 keeps much of the start's robustness (OOD accuracy) at little ID cost. Here the start is whatever
model a method's branch began from (``daft_core.methods.Method.start``): the pretrained model for FT, the
linear probe for LP-FT, the BN-converted model for DAFT.

Every floating tensor of the state dict is interpolated, parameters *and* buffers (BatchNorm running
statistics), so α = 0 is exactly the start and α = 1 exactly the fine-tuned model; integer buffers
(``num_batches_tracked``) are the fine-tuned model's. The interpolated running statistics are not the
statistics the interpolated network would measure; we keep them (no re-estimation pass) so each point of the
curve is a pure function of the two checkpoints.

The start's head is the one the run began from (:func:`start_model`): the probe's for LP-FT, zero for
DAFT's zero head, and zero as well for FT's random head. That random head is drawn inside the loop and
stored nowhere (the pretrained checkpoint's head is a different draw), and the paper's start is a
zero-shot classifier, which a random head is not; a zero start head makes θ(α)'s head α·head_ft, so
the mix acts on the backbone and only scales the fine-tuned head (the argmax is unchanged by that
scaling). ``benchmarks/compare_methods.py`` uses the same rule.

α is chosen on ID val (the ID test set is never used for selection); ties go to the smaller α, the model
closer to the start, which WiSE-FT's premise says is the more robust one.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from daft_core.devices import resolve_device

__all__ = ["DEFAULT_ALPHAS", "WiseResult", "check_alphas", "interpolate", "select_alpha", "start_model"]

log = logging.getLogger(__name__)

DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0


@dataclass
class WiseResult:
    """The chosen mixing coefficient, its interpolated model, and the ID val curve (ascending α)."""

    alpha: float
    model: nn.Module
    curve: list[dict[str, float]] = field(default_factory=list)  # [{"alpha", "val_accuracy"}, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "curve": [dict(p) for p in self.curve]}


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The grid sorted ascending without duplicates; ValueError when empty or a value is outside [0, 1]."""
    values = [float(a) for a in alphas]
    if not values:
        raise ValueError("alphas is empty; give at least one mixing coefficient in [0, 1], e.g. 0.0 ... 1.0")
    bad = [a for a in values if not 0.0 <= a <= 1.0]  # also refuses NaN
    if bad:
        raise ValueError(f"alphas must lie in [0, 1] (0: the start, 1: the fine-tuned model), got {bad}")
    return sorted(set(values))


@torch.no_grad()
def start_model(start: nn.Module, head_init: str, probe_head: nn.Linear | None = None) -> nn.Module:
    """A copy of `start` with the head a run of a recipe with `head_init` began from (see the module doc).

    ``"probe"``: `probe_head`'s weights if given, else `start`'s own head (the linear probe's model);
    ``"zero"`` / ``"random"``: a zero head. `start` is not modified.
    """
    if head_init not in ("probe", "zero", "random"):
        raise ValueError(f"unknown head_init {head_init!r}; expected probe, zero or random")
    model = copy.deepcopy(start)
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"start_model needs a model with a linear `head`, got {type(head).__name__}")
    if head_init == "probe":
        if probe_head is not None:
            head.weight.copy_(probe_head.weight)
            if head.bias is not None and probe_head.bias is not None:
                head.bias.copy_(probe_head.bias)
        return model
    head.weight.zero_()
    if head.bias is not None:
        head.bias.zero_()
    return model


def _check_pair(start: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    """ValueError naming the differing keys/shapes: only two checkpoints of one architecture mix."""
    missing, extra = sorted(set(finetuned) - set(start)), sorted(set(start) - set(finetuned))
    if missing or extra:
        raise ValueError(
            "WiSE-FT needs two models of the same architecture: the fine-tuned model has "
            f"{len(missing)} tensor(s) the start lacks {missing[:5]} and the start {len(extra)} it lacks "
            f"{extra[:5]}; pass the model the fine-tuned one started from"
        )
    for name, t in finetuned.items():
        s = start[name]
        if s.shape != t.shape or s.is_floating_point() != t.is_floating_point():
            raise ValueError(
                f"WiSE-FT: tensor {name!r} differs between the models (start {tuple(s.shape)} {s.dtype}, "
                f"fine-tuned {tuple(t.shape)} {t.dtype}); e.g. heads for different class counts. Pass the "
                "model the fine-tuned one started from"
            )


def _mix(s: torch.Tensor, f: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - α)·s + α·f in float64, cast back: exactly s at α = 0 and exactly f at α = 1."""
    if not f.is_floating_point():
        return f.clone()
    mixed = (1.0 - alpha) * s.to(f.device, torch.float64) + alpha * f.to(torch.float64)
    return mixed.to(f.dtype)


@torch.no_grad()
def interpolate(start: nn.Module, finetuned: nn.Module, alpha: float) -> nn.Module:
    """A new module θ(α) = (1 - α)·θ_start + α·θ_ft (a copy of `finetuned` with mixed weights).

    Every floating parameter and buffer of the state dict is mixed; integer buffers come from `finetuned`.
    The inputs are not modified; the result lives where `finetuned` does and keeps its attributes (a
    DaftModel's ``spec`` and ``extra``). ValueError when α is outside [0, 1] or the architectures differ.
    """
    (alpha,) = check_alphas([alpha])
    s_state, f_state = start.state_dict(), finetuned.state_dict()
    _check_pair(s_state, f_state)
    out = copy.deepcopy(finetuned)
    out.load_state_dict({k: _mix(s_state[k], f, alpha) for k, f in f_state.items()})
    return out


@torch.no_grad()
def _correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> int:
    device = next(iter(model.state_dict().values())).device
    hits = 0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device, non_blocking=True)
        y = labels[i : i + batch_size].to(device, non_blocking=True)
        hits += int((model(x).argmax(dim=1) == y).sum())
    return hits


@torch.no_grad()
def select_alpha(
    start: nn.Module,
    finetuned: nn.Module,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 256,
    device: str | torch.device | None = "auto",
) -> WiseResult:
    """Evaluate θ(α) on ID val for each α (ascending) and return the best (ties: the smaller α).

    `val_images` are what the models take (uint8 (N, C, H, W) for a DaftModel), `val_labels` int (N,).
    The models run in eval mode on `device`; the inputs are not modified. The returned model is
    :func:`interpolate` at the chosen α (on `finetuned`'s device), ``curve`` every α's ID val accuracy.
    """
    grid = check_alphas(alphas)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = torch.as_tensor(val_labels)
    n = int(labels.shape[0])
    if n == 0 or int(val_images.shape[0]) != n:
        raise ValueError(f"need a non-empty val set, one label per image; got {val_images.shape[0]} / {n}")
    dev = resolve_device(device)
    s_state, f_state = start.state_dict(), finetuned.state_dict()
    _check_pair(s_state, f_state)
    work = copy.deepcopy(finetuned).to(dev).eval()  # one working copy, reloaded per α
    s_dev = {k: v.to(dev) for k, v in s_state.items()}
    f_dev = {k: v.to(dev) for k, v in f_state.items()}
    curve: list[dict[str, float]] = []
    best_alpha, best_hits = grid[0], -1
    for alpha in grid:
        work.load_state_dict({k: _mix(s_dev[k], f, alpha) for k, f in f_dev.items()})
        hits = _correct(work, val_images, labels, batch_size)
        curve.append({"alpha": alpha, "val_accuracy": hits / n})
        log.info("WiSE-FT alpha=%.3g: ID val accuracy %.4f", alpha, hits / n)
        if hits > best_hits:  # strict: on a tie the earlier (smaller) α stays
            best_alpha, best_hits = alpha, hits
    del work, s_dev, f_dev
    return WiseResult(alpha=best_alpha, model=interpolate(start, finetuned, best_alpha), curve=curve)
