"""One fine-tuning run as an object: built once from a recipe, then handed to the epoch loop.

Bundling the run's collaborators keeps the loop's functions to ``(run, epoch)`` and makes the set-up order,
which bit-identical resume depends on, live in exactly one place (`start_run`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
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
from daft_core.training.setup import (
    build_optimizer,
    convert_bn,
    init_head,
    input_size,
    lr_lambda,
    steps_per_epoch,
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

    def restore_caller_state(self) -> None:
        """Undo what set-up changed on the caller's model beyond its weights."""
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
) -> FinetuneRun:
    """Seed, apply the recipe, and resume from ``checkpoint_dir/last.pt`` when it belongs to this run.

    Expects to run inside a forked RNG scope: it reseeds the global generators.
    """
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = ckpt = start_state = None
    if ckpt_dir is not None:
        # Before set-up touches the model: the fingerprint digests the start weights as given.
        fingerprint = fingerprint_data(model, train, val, recipe, config, bn_converted, probe_head)
        ckpt = open_last(ckpt_dir, fingerprint, resume)
        if ckpt is not None:  # kept until the checkpoint is in, to start over if it does not fit
            start_state = cpu_state(model)
    args = (model, train, val, recipe, config, device, probe_head, bn_converted, fingerprint, ckpt_dir)
    try:
        return _build_run(*args, ckpt)
    except _ResumeFailed as e:
        assert ckpt_dir is not None and start_state is not None
        model.load_state_dict(start_state)
        discard_unusable(ckpt_dir, f"does not fit this run ({e})", resume)
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
    ckpt: Mapping[str, Any] | None,
) -> FinetuneRun:
    """Set-up in the one order bit-identical resume depends on, then the checkpoint's state, if any."""
    torch.default_generator.manual_seed(config.seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(config.seed)
    model.to(device)
    size = input_size(model, train)
    drop_last = config.drop_last and len(train.labels) >= config.batch_size
    conversion_report = None
    if recipe.convert_bn and not bn_converted:
        # Also on resume: conversion may change module attributes that a state_dict does not carry.
        conversion_report = convert_bn(model, train, config, device, drop_last)
    init_head(model, recipe, probe_head, config.seed)

    optimizer, saved_grad_flags = build_optimizer(model, recipe, config)
    steps = steps_per_epoch(len(train.labels), config.batch_size, drop_last)
    warmup = round(config.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.epochs * steps, warmup))
    gens = Generators(
        shuffle=torch.Generator().manual_seed(config.seed),
        augment=torch.Generator(device=device).manual_seed(config.seed + 1),
    )
    progress = RunProgress()
    if ckpt is not None:
        try:
            progress = restore_progress(ckpt, model, optimizer, scheduler, gens, device)
        except Exception as e:
            for p, flag in saved_grad_flags:
                p.requires_grad_(flag)
            detail = (str(e).strip().splitlines() or ["no detail"])[0][:200]
            raise _ResumeFailed(f"{type(e).__name__}: {detail}") from e
        assert ckpt_dir is not None
        logger.info("resuming %s from %s after epoch %d", recipe.name, ckpt_dir / LAST_NAME, progress.epoch)
    ctx = make_step_context(model, optimizer, config, device)
    logger.info(
        "fine-tuning %s on %s: %d epochs x %d steps, batch %d, lrs head %g / backbone %g, bn %s",
        recipe.name,
        device,
        config.epochs,
        steps,
        config.batch_size,
        recipe.head_lr,
        recipe.backbone_lr,
        recipe.bn_mode,
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
    )
