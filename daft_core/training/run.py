"""One fine-tuning run as an object: built once from a recipe, then handed to the epoch loop.

Bundling the run's collaborators keeps the loop's functions to ``(run, epoch)`` and makes the set-up order,
which bit-identical resume depends on, live in exactly one place (`start_run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daft_core.recipes import Recipe
from daft_core.training.checkpoint import (
    LAST_NAME,
    Generators,
    RunProgress,
    cpu_state,
    discard_unusable,
    fingerprint_data,
    open_last,
    restore_progress,
)
from daft_core.training.config import FinetuneConfig, ResumeMode
from daft_core.training.distributed import RANK_SEED_STRIDE, Dist, on_main
from daft_core.training.setup import (
    build_optimizer,
    check_sync_bn,
    convert_bn,
    init_head,
    input_size,
    lr_lambda,
    steps_per_epoch,
    to_sync_bn,
    undo_sync_bn,
)
from daft_core.training.step import StepContext, make_step_context

logger = logging.getLogger(__name__)


@dataclass
class FinetuneRun:
    """Everything the epoch loop reads or advances; ``progress`` is what a checkpoint carries."""

    model: nn.Module
    train: Any  # ImageSet-like: uint8 ``images``, int64 ``labels``
    val: Any
    recipe: Recipe
    config: FinetuneConfig
    device: torch.device
    ctx: StepContext
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gens: Generators
    size: int | tuple[int, int]  # training/validation input size
    drop_last: bool
    steps_per_epoch: int
    fingerprint: dict[str, Any] | None  # what last.pt must match (None without a checkpoint_dir)
    checkpoint_dir: Path | None
    conversion_report: dict[str, Any] | None  # from this process's BN conversion, if it ran one
    resumed_conversion_report: dict[str, Any] | None  # what a resumed ``last.pt`` recorded
    progress: RunProgress
    saved_grad_flags: list[tuple[nn.Parameter, bool]]  # the caller's requires_grad, put back at the end
    dist: Dist = field(default_factory=Dist)  # this process's rank (world_size 1: not distributed)
    sync_bn_swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def restore_caller_state(self) -> None:
        """Undo what set-up changed on the caller's model beyond its weights."""
        undo_sync_bn(self.sync_bn_swaps)
        for p, flag in self.saved_grad_flags:
            p.requires_grad_(flag)
        self.model.to(memory_format=torch.contiguous_format)


class _ResumeFailed(Exception):
    """A ``last.pt`` that matched the fingerprint but could not be put back into the live objects."""


def start_run(
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    device: torch.device,
    *,
    probe_head: nn.Linear | Mapping[str, torch.Tensor] | None,
    bn_converted: bool,
    checkpoint_dir: str | os.PathLike[str] | None,
    resume: ResumeMode = "auto",
    dist_info: Dist | None = None,
) -> FinetuneRun:
    """Seed, apply the recipe, and resume from ``checkpoint_dir/last.pt`` when it belongs to this run.

    Expects to run inside a forked RNG scope: it reseeds the global generators. Under torch.distributed
    (``dist_info``) rank 0 alone reads, judges and sets aside checkpoint files, and hands the checkpoint it
    resumes from to the other ranks.
    """
    d = dist_info or Dist()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = ckpt = start_state = None
    if ckpt_dir is not None:
        # Before set-up touches the model: the fingerprint digests the start weights as given.
        def open_checkpoint() -> tuple[dict[str, Any], dict[str, Any] | None]:
            fp = fingerprint_data(
                model, train, val, recipe, config, bn_converted, probe_head, world_size=d.world_size
            )
            return fp, open_last(ckpt_dir, fp, resume)

        fingerprint, ckpt = on_main(open_checkpoint, d, device)
        if ckpt is not None:  # kept until the checkpoint is in, to start over if it does not fit
            start_state = cpu_state(model)
    args = (model, train, val, recipe, config, device, probe_head, bn_converted, fingerprint, ckpt_dir, d)
    try:
        return _build_run(*args, ckpt)
    except _ResumeFailed as e:
        assert ckpt_dir is not None and start_state is not None
        model.load_state_dict(start_state)
        # Every rank failed alike (same file, same model): "must" raises on all, rank 0 sets the file aside.
        discard_unusable(ckpt_dir, f"does not fit this run ({e})", resume, act=d.is_main)
        return _build_run(*args, None)


def _build_run(
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    device: torch.device,
    probe_head: Any,
    bn_converted: bool,
    fingerprint: dict[str, Any] | None,
    ckpt_dir: Path | None,
    d: Dist,
    ckpt: Mapping[str, Any] | None,
) -> FinetuneRun:
    """Set-up in the one order bit-identical resume depends on, then the checkpoint's state, if any."""
    check_sync_bn(config.sync_bn, device, d.world_size)
    rank_seed = config.seed + d.rank * RANK_SEED_STRIDE  # this rank's own streams (rank 0: the seed)
    torch.default_generator.manual_seed(rank_seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(rank_seed)
    model.to(device)
    size = input_size(model, train)
    n_train, global_batch = len(train.labels), config.batch_size * d.world_size
    if d.active and n_train < global_batch:
        raise ValueError(
            f"{n_train} training images cannot fill one global batch of {d.world_size} ranks x "
            f"batch_size {config.batch_size} = {global_batch}: lower batch_size (it is per rank) or start "
            "fewer processes"
        )
    drop_last = d.active or (config.drop_last and n_train >= config.batch_size)
    conversion_report = None
    if recipe.convert_bn and not bn_converted:
        # Also on resume: conversion may change module attributes that a state_dict does not carry.
        conversion_report = convert_bn(model, train, config, device, drop_last, d.rank, d.world_size)
    sync_bn_swaps = to_sync_bn(model) if d.active and config.sync_bn else []
    init_head(model, recipe, probe_head, config.seed)

    optimizer, saved_grad_flags = build_optimizer(model, recipe, config)
    steps = steps_per_epoch(n_train, config.batch_size, drop_last, d.world_size)
    warmup = round(config.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.epochs, steps, warmup)
    )
    gens = Generators(
        shuffle=torch.Generator().manual_seed(config.seed),  # alike on every rank: one global permutation
        augment=torch.Generator(device=device).manual_seed(rank_seed + 1),
    )
    progress = RunProgress()
    if ckpt is not None:
        try:
            progress = restore_progress(ckpt, model, optimizer, scheduler, gens, device, d.rank, d.world_size)
        except Exception as e:
            undo_sync_bn(sync_bn_swaps)
            for p, flag in saved_grad_flags:
                p.requires_grad_(flag)
            detail = (str(e).strip().splitlines() or ["no detail"])[0][:200]
            raise _ResumeFailed(f"{type(e).__name__}: {detail}") from e
        assert ckpt_dir is not None
        logger.info("resuming %s from %s after epoch %d", recipe.name, ckpt_dir / LAST_NAME, progress.epoch)
    ctx = make_step_context(model, optimizer, config, device, data_parallel=d.active)
    logger.info(
        "fine-tuning %s on %s%s: %d epochs x %d steps, batch %d%s, lrs head %g / backbone %g (%s), bn %s%s",
        recipe.name,
        device,
        f" (rank {d.rank} of {d.world_size})" if d.active else "",
        config.epochs,
        steps,
        config.batch_size,
        f" per rank ({global_batch} per step)" if d.active else "",
        recipe.head_lr,
        recipe.backbone_lr,
        config.schedule,
        recipe.bn_mode,
        " (SyncBatchNorm)" if sync_bn_swaps else "",
    )
    return FinetuneRun(
        model=model,
        train=train,
        val=val,
        recipe=recipe,
        config=config,
        device=device,
        ctx=ctx,
        optimizer=optimizer,
        scheduler=scheduler,
        gens=gens,
        size=size,
        drop_last=drop_last,
        steps_per_epoch=steps,
        fingerprint=fingerprint,
        checkpoint_dir=ckpt_dir,
        conversion_report=conversion_report,
        resumed_conversion_report=ckpt.get("conversion_report") if ckpt is not None else None,
        progress=progress,
        saved_grad_flags=saved_grad_flags,
        dist=d,
        sync_bn_swaps=sync_bn_swaps,
    )
