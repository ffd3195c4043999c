"""What a fine-tuning run is asked to do (`FinetuneConfig`), what it returns, and how it refuses to go on."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from daft_core.augment import AugmentConfig
from daft_core.errors import CheckpointError

__all__ = [
    "RESUME_MODES",
    "SCHEDULES",
    "CheckpointError",
    "CheckpointMismatchError",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "ResumeMode",
    "Schedule",
]

ResumeMode = Literal["auto", "must", "never"]
RESUME_MODES: tuple[str, ...] = ("auto", "must", "never")
Schedule = Literal["cosine_epoch", "cosine_step"]
SCHEDULES: tuple[str, ...] = ("cosine_epoch", "cosine_step")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; continuing would only corrupt the weights."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """``checkpoint_dir/last.pt`` belongs to a different run (recipe, config, start weights or data).

    Raised only with ``finetune(..., resume="must")``; "auto" sets such a file aside and starts over. A
    `CheckpointError` (the pipeline's one error path catches it) and, as before, a ``ValueError``.
    """


@dataclass(frozen=True)
class FinetuneConfig:
    """Loop hyper-parameters shared by every recipe (the learning rates live in the `Recipe`).

    Defaults are the paper's (Ha et al. 2024, official code): 20 epochs, SGD momentum 0.9 without weight
    decay, and ``schedule="cosine_epoch"``: torch's ``CosineAnnealingLR(T_max=epochs)`` stepped once per
    epoch, so 0-based epoch ``e`` trains at ``lr * 0.5 * (1 + cos(pi * e / epochs))`` throughout.
    ``"cosine_step"`` decays the same curve per optimisation step instead. ``warmup_epochs`` ramps the lr
    linearly per step over its first steps with either schedule; after it, the schedule's own value applies.
    ``batch_size`` is per process: under torch.distributed (see docs/distributed.md) one optimisation
    step sees ``world_size * batch_size`` images. ``sync_bn`` turns train-mode BN into SyncBatchNorm there
    (statistics over the global batch); the default keeps per-process batch statistics, as the paper's
    single-GPU batches of 64.

    ``amp``/``channels_last``: "auto" turns bf16 autocast (training and per-epoch validation) / channels-last
    on for CUDA only (CPU stays fp32 and bit-reproducible). ``compile`` wraps the model in
    ``torch.compile(mode=compile_mode)``; on CPU (inductor, needs a C++ compiler) "reduce-overhead" falls
    back to the default mode, as CUDA graphs are CUDA-only.
    ``drop_last`` drops a ragged final training batch (fixed shapes for compiled graphs, no size-1 BN
    batches) unless the training set is smaller than one batch.
    """

    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: Schedule = "cosine_epoch"
    nesterov: bool = False
    warmup_epochs: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    device: str = "auto"
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    eval_batch_size: int = 256
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    drop_last: bool = True
    sync_bn: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("FinetuneConfig: epochs must be >= 0 and batch sizes >= 1")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("FinetuneConfig: need 0 <= momentum < 1, weight_decay >= 0, warmup_epochs >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"FinetuneConfig: schedule must be one of {SCHEDULES} (per-epoch cosine as in the paper, or "
                f"per-step), got {self.schedule!r}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("FinetuneConfig: label_smoothing must be in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError("FinetuneConfig: grad_clip must be > 0 or None")
        if self.amp not in ("auto", "bf16", "off") or self.channels_last not in ("auto", "on", "off"):
            raise ValueError("FinetuneConfig: amp must be auto|bf16|off and channels_last auto|on|off")
        if self.device != "auto" and torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"FinetuneConfig: device must be auto, cpu or cuda[:N], got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for params logging and the checkpoint fingerprint)."""
        d = dataclasses.asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        """Inverse of `to_dict`; keys an older version did not write (``schedule``, ``sync_bn``) take
        their defaults."""
        d = dict(d)
        if isinstance(d.get("augment"), Mapping):
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        return cls(**d)


@dataclass
class FinetuneResult:
    """``model`` holds the best-ID-val weights; ``best_epoch`` is 1-based (0: no epoch was run).

    ``world_size``: processes that trained it (1 unless run under torch.distributed); every rank gets the
    same result.
    """

    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, Any]]
    conversion_report: dict[str, Any] | None
    world_size: int = 1
