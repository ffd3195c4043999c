"""Resumable checkpoints: ``last.pt`` carries everything a killed run needs to finish bit-identically.

That is the weights, optimizer and scheduler state, every RNG the loop draws from, and the best-so-far
state; a fingerprint of the run's inputs keeps a checkpoint from being continued by a different run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daft_core.atomic import atomic_file
from daft_core.recipes import Recipe
from daft_core.training.config import CheckpointMismatchError, FinetuneConfig
from daft_core.training.setup import cuda_index, head

if TYPE_CHECKING:
    from daft_core.training.run import FinetuneRun

CHECKPOINT_FORMAT = 1
LAST_NAME, BEST_NAME = "last.pt", "best.pt"


@dataclass
class RunProgress:
    """Mutable loop state that a checkpoint must carry."""

    epoch: int = 0  # completed epochs
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Generators:
    """The loop's own RNGs, so shuffling and augmentation draw streams that a checkpoint can restore."""

    shuffle: torch.Generator
    augment: torch.Generator


def fingerprint_data(
    model: nn.Module, train: Any, val: Any, recipe: Recipe, config: FinetuneConfig, bn_converted: bool
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (plain dict, stored and diffed on mismatch)."""
    cfg = config.to_dict()
    cfg.pop("eval_batch_size")  # does not affect the trained weights
    return {
        "recipe": recipe.to_dict(),
        "config": cfg,
        "bn_converted": bool(bn_converted),
        "train": [len(train.labels), list(train.images.shape[1:])],
        "val": [len(val.labels), list(val.images.shape[1:])],
        "model": [type(model).__name__, sum(p.numel() for p in model.parameters())],
        "head": list(head(model).weight.shape),
    }


def digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy: later steps must not change it, and it must load on any device."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def rng_states(gens: Generators, device: torch.device) -> dict[str, torch.Tensor]:
    states = {
        "torch_cpu": torch.get_rng_state(),
        "shuffle": gens.shuffle.get_state(),
        "augment": gens.augment.get_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(cuda_index(device))
    return states


def restore_rng(states: Mapping[str, torch.Tensor], gens: Generators, device: torch.device) -> None:
    torch.set_rng_state(states["torch_cpu"])
    gens.shuffle.set_state(states["shuffle"])
    gens.augment.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], cuda_index(device))


def _save(obj: Any, path: Path) -> None:
    """A kill mid-write must leave the previous checkpoint, never a torn one."""
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def load_last(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load ``last.pt`` and refuse it when it belongs to another run."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    stored = ckpt.get("fingerprint_data", {})
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != digest(fingerprint):
        changes = diff(stored, fingerprint)
        raise CheckpointMismatchError(
            f"{path} was written by a different run (differs in: {changes or 'checkpoint format'}). "
            "Delete it to start over, or pass another checkpoint_dir."
        )
    return ckpt


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted ``key: old -> new`` lines, so a mismatch says which setting changed."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def write_checkpoints(run: FinetuneRun, ckpt_dir: Path) -> None:
    """best.pt first, then last.pt, so a kill between the two never loses the best weights."""
    progress = run.progress
    fingerprint = digest(run.fingerprint)
    if progress.best_epoch == progress.epoch:
        best = {
            "format": CHECKPOINT_FORMAT,
            "state_dict": progress.best_state,
            "epoch": progress.best_epoch,
            "val_accuracy": progress.best_val_accuracy,
            "recipe": run.recipe.to_dict(),
            "fingerprint": fingerprint,
        }
        _save(best, ckpt_dir / BEST_NAME)
    last = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "fingerprint_data": run.fingerprint,
        "epoch": progress.epoch,
        "model_state": cpu_state(run.model),
        "optimizer_state": run.optimizer.state_dict(),
        "scheduler_state": run.scheduler.state_dict(),
        "rng": rng_states(run.gens, run.device),
        "best_state": progress.best_state,
        "best_epoch": progress.best_epoch,
        "best_val_accuracy": progress.best_val_accuracy,
        "history": progress.history,
        "conversion_report": run.conversion_report,
    }
    _save(last, ckpt_dir / LAST_NAME)


def resume(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: Generators,
    device: torch.device,
) -> RunProgress:
    """Put a loaded ``last.pt`` back into the live objects; returns the progress to continue from."""
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    scheduler.load_state_dict(ckpt["scheduler_state"])
    restore_rng(ckpt["rng"], gens, device)
    return RunProgress(
        epoch=int(ckpt["epoch"]),
        best_epoch=int(ckpt["best_epoch"]),
        best_val_accuracy=float(ckpt["best_val_accuracy"]),
        best_state=ckpt["best_state"],
        history=[dict(r) for r in ckpt["history"]],
    )
