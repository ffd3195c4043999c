"""Resumable checkpoints: ``last.pt`` carries everything a killed run needs to finish bit-identically.

That is the weights, optimizer and scheduler state, every RNG the loop draws from, and the best-so-far
state. A fingerprint of the run's inputs (recipe, config, digests of the start weights and of the data)
keeps a checkpoint from being continued by a different run: such a file, or one that cannot be read, is
set aside (``last.pt.stale-<time>``, newest only) and the run starts fresh, or, with ``resume="must"``,
refused with an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daft_core.atomic import atomic_file
from daft_core.recipes import Recipe
from daft_core.training.config import (
    RESUME_MODES,
    CheckpointError,
    CheckpointMismatchError,
    FinetuneConfig,
    ResumeMode,
)
from daft_core.training.setup import cuda_index, probe_weights

if TYPE_CHECKING:
    from daft_core.training.run import FinetuneRun

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: the fingerprint covers start weights and data content
FINGERPRINT_VERSION = 2
LAST_NAME, BEST_NAME = "last.pt", "best.pt"
STALE_INFIX = ".stale-"


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
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    bn_converted: bool,
    probe_head: Any = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (plain dict, stored and diffed on mismatch).

    The recipe and every config field that affects the trained weights (the schedule included), and the
    number of processes (``config.world_size``: it sets the global batch); the start state (the weights as
    handed to `finetune`, before BN conversion or head init, plus the probe head a "probe" recipe starts
    from); and the content of the training and validation sets. Call it before set-up touches the model.
    """
    cfg = config.to_dict()
    cfg.pop("eval_batch_size")  # does not affect the trained weights
    cfg["world_size"] = int(world_size)
    spec = getattr(model, "spec", None)
    probe = None
    if recipe.head_init == "probe" and probe_head is not None:
        weight, bias = probe_weights(probe_head)
        probe = state_digest({"weight": weight, "bias": bias})
    return {
        "version": FINGERPRINT_VERSION,
        "recipe": recipe.to_dict(),
        "config": cfg,
        "start": {
            "model": type(model).__name__,
            "spec": _plain(spec) if isinstance(spec, Mapping) else None,
            "bn_converted": bool(bn_converted),
            "weights": state_digest(model.state_dict()),
            "probe_head": probe,
        },
        "data": {"train": set_digest(train), "val": set_digest(val)},
    }


def _plain(obj: Any) -> Any:
    """JSON round trip: a stable, ``weights_only``-loadable copy."""
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


def _hash_tensor(h: Any, t: torch.Tensor) -> None:
    """dtype, shape and raw bytes (any dtype, bf16 included: hashed as bytes, not through numpy's types)."""
    t = t.detach()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).numpy())


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict's names and tensors in sorted key order (non-tensor entries by repr)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(f"{key}\0".encode())
        value = state[key]
        if isinstance(value, torch.Tensor):
            _hash_tensor(h, value)
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def set_digest(ds: Any) -> dict[str, Any]:
    """Count, image shape and a sha256 of an ImageSet's images, labels and class names."""
    h = hashlib.sha256()
    _hash_tensor(h, ds.images)
    _hash_tensor(h, ds.labels)
    h.update(json.dumps(list(getattr(ds, "class_names", []) or []), default=repr).encode())
    return {"count": len(ds.labels), "shape": list(ds.images.shape[1:]), "sha256": h.hexdigest()}


def digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# What a fingerprint difference is called in a warning: the first matching key prefix wins.
_AREAS = (
    ("recipe", "recipe"),
    ("config", "config"),
    ("start", "start weights"),
    ("data.train", "training data"),
    ("data.val", "validation data"),
)


def diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_changes(old: Any, new: Mapping[str, Any]) -> str:
    """A short diff, by area: ``recipe (head_lr: 0.01 -> 0.5); training data (sha256: ... -> ...)``."""
    if not isinstance(old, Mapping) or old.get("version") != new.get("version"):
        return "fingerprint format (written by another daft_core version)"
    groups: dict[str, list[str]] = {}
    for key, a, b in diff(old, new):
        area, rest = "other", key
        for prefix, label in _AREAS:
            if key == prefix or key.startswith(prefix + "."):
                area, rest = label, key[len(prefix) + 1 :] or key
                break
        groups.setdefault(area, []).append(f"{rest}: {_short(a)} -> {_short(b)}")
    parts = []
    for area, items in groups.items():
        more = f", +{len(items) - 3} more" if len(items) > 3 else ""
        parts.append(f"{area} ({', '.join(items[:3])}{more})")
    return "; ".join(parts) or "fingerprint digest only"


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


_LAST_TYPES: dict[str, type | tuple[type, ...]] = {
    "fingerprint": str,
    "fingerprint_data": dict,
    "epoch": int,
    "model_state": dict,
    "optimizer_state": dict,
    "scheduler_state": dict,
    "rng": dict,
    "best_state": (dict, type(None)),
    "best_epoch": int,
    "best_val_accuracy": (float, int),
    "history": list,
    "conversion_report": (dict, type(None)),
}
_RNG_KEYS = ("torch_cpu", "shuffle", "augment")


def _structure_problem(ckpt: dict[str, Any], max_epoch: int) -> str | None:
    """Why a ``last.pt`` of the current format cannot be resumed from (None: it looks complete)."""
    missing = [k for k in _LAST_TYPES if k not in ckpt]
    if missing:
        return f"missing keys {missing}"
    for key, typ in _LAST_TYPES.items():
        if not isinstance(ckpt[key], typ) or isinstance(ckpt[key], bool):
            return f"{key!r} is a {type(ckpt[key]).__name__}"
    epoch, best_epoch = ckpt["epoch"], ckpt["best_epoch"]
    if not 0 <= best_epoch <= epoch <= max_epoch:
        return f"epoch {epoch} / best epoch {best_epoch} out of range for a {max_epoch}-epoch run"
    for key in ("model_state", "best_state"):
        state = ckpt[key]
        if state is not None and not all(isinstance(v, torch.Tensor) for v in state.values()):
            return f"{key!r} holds non-tensors"
    if epoch > 0 and ckpt["best_state"] is None:
        return "no best weights after a completed epoch"
    rng = ckpt["rng"]
    if not all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8 for k in _RNG_KEYS):
        return f"'rng' must hold uint8 tensors {list(_RNG_KEYS)}"
    history = ckpt["history"]
    if len(history) != epoch or not all(isinstance(r, dict) for r in history):
        return f"history holds {len(history)} records for {epoch} epochs"
    if not {"state", "param_groups"} <= set(ckpt["optimizer_state"]):
        return "'optimizer_state' is not an optimizer state dict"
    return None


def _read_last(path: Path, fingerprint: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str, str | None]:
    """(checkpoint, kind, detail): kind "ok", "corrupt" (detail: what is wrong) or "mismatch" (what
    differs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, unsafe pickle, I/O error: all unreadable
        return None, "corrupt", f"unreadable ({type(e).__name__}: {_first_line(e)})"
    if not isinstance(ckpt, dict):
        return None, "corrupt", f"holds a {type(ckpt).__name__}, not a checkpoint dict"
    fmt = ckpt.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        return None, "corrupt", "no checkpoint format number"
    if fmt != CHECKPOINT_FORMAT:
        return None, "mismatch", f"checkpoint format {fmt} (this daft_core writes {CHECKPOINT_FORMAT})"
    problem = _structure_problem(ckpt, int(fingerprint["config"]["epochs"]))
    if problem is not None:
        return None, "corrupt", problem
    if ckpt["fingerprint"] != digest(dict(fingerprint)):
        return None, "mismatch", describe_changes(ckpt["fingerprint_data"], fingerprint)
    return ckpt, "ok", None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no detail"


def check_resume_mode(mode: str) -> None:
    if mode not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {mode!r}")


def open_last(ckpt_dir: Path, fingerprint: Mapping[str, Any], mode: ResumeMode) -> dict[str, Any] | None:
    """The ``last.pt`` to resume from, or None to start fresh; ``mode`` decides what happens to a file that
    belongs to another run or cannot be read (see `finetune`)."""
    path = ckpt_dir / LAST_NAME
    if mode == "never":
        for name in (LAST_NAME, BEST_NAME):
            if (ckpt_dir / name).exists():
                logger.info("resume='never': discarding %s", ckpt_dir / name)
                (ckpt_dir / name).unlink()
        return None
    if not path.exists():
        return None
    ckpt, kind, detail = _read_last(path, fingerprint)
    if kind == "ok":
        return ckpt
    if kind == "mismatch":
        if mode == "must":
            raise CheckpointMismatchError(
                f"{path} was written by a different run (differs in: {detail}). Delete it to start over "
                "(or pass resume='auto', which sets it aside), or pass another checkpoint_dir."
            )
        moved = set_aside(ckpt_dir)
        logger.warning(
            "not resuming from %s: it was written by a different run (differs in: %s); moved it to %s "
            "and starting fresh",
            path,
            detail,
            moved,
        )
        return None
    discard_unusable(ckpt_dir, str(detail), mode)
    return None


def discard_unusable(ckpt_dir: Path, problem: str, mode: ResumeMode, act: bool = True) -> None:
    """A ``last.pt`` that cannot be resumed from: raise with "must", else set it aside with a warning.

    ``act=False`` (ranks other than 0): raise alike, but leave the files to rank 0.
    """
    path = ckpt_dir / LAST_NAME
    if mode == "must":
        raise CheckpointError(
            f"{path} is corrupt: {problem}. Delete it to start over (or pass resume='auto', which sets it "
            "aside)."
        )
    if not act:
        return
    moved = set_aside(ckpt_dir)
    logger.warning(
        "not resuming from %s: it is corrupt (%s); moved it to %s and starting fresh", path, problem, moved
    )


def set_aside(ckpt_dir: Path) -> Path:
    """Rename ``last.pt`` (and ``best.pt``) to ``<name>.stale-<time>``; only the newest such copy stays."""
    stamp = datetime.now().strftime("%Y%m%dT%H%M%S.%f")
    moved = ckpt_dir / f"{LAST_NAME}{STALE_INFIX}{stamp}"
    for name in (LAST_NAME, BEST_NAME):
        src, dst = ckpt_dir / name, ckpt_dir / f"{name}{STALE_INFIX}{stamp}"
        if not src.exists():
            continue
        try:
            os.replace(src, dst)
        except OSError as e:
            raise CheckpointError(f"cannot move {src} aside to start fresh: {e}") from e
        for old in ckpt_dir.glob(f"{name}{STALE_INFIX}*"):
            if old != dst:
                old.unlink(missing_ok=True)
    return moved


def write_checkpoints(
    run: FinetuneRun, ckpt_dir: Path, rng_ranks: list[dict[str, torch.Tensor]] | None = None
) -> None:
    """best.pt first, then last.pt, so a kill between the two never loses the best weights.

    ``rng_ranks`` (under torch.distributed, written by rank 0): every rank's RNG states, in rank order, so
    each rank resumes its own augmentation stream.
    """
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
    if rng_ranks is not None:
        last["rng_ranks"] = rng_ranks
    _save(last, ckpt_dir / LAST_NAME)


def restore_progress(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: Generators,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> RunProgress:
    """Put a loaded ``last.pt`` back into the live objects; returns the progress to continue from.

    Raises (any error) when the file does not fit them; the caller then starts over from the start weights.
    Under torch.distributed rank ``r`` takes its own RNG states from ``rng_ranks[r]``.
    """
    rng = ckpt["rng"]
    if world_size > 1:
        ranks = ckpt.get("rng_ranks")
        if not isinstance(ranks, list) or len(ranks) != world_size:
            raise ValueError(f"'rng_ranks' does not hold the RNG states of {world_size} ranks")
        rng = ranks[rank]
    live = model.state_dict()
    for key in ("model_state", "best_state"):
        state = ckpt[key]
        if state is not None and (
            state.keys() != live.keys() or any(state[k].shape != live[k].shape for k in live)
        ):
            raise ValueError(f"{key!r} does not fit the model (keys or shapes differ)")
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    scheduler.load_state_dict(ckpt["scheduler_state"])
    restore_rng(rng, gens, device)
    return RunProgress(
        epoch=int(ckpt["epoch"]),
        best_epoch=int(ckpt["best_epoch"]),
        best_val_accuracy=float(ckpt["best_val_accuracy"]),
        best_state=ckpt["best_state"],
        history=[dict(r) for r in ckpt["history"]],
    )
