"""The step engine: one optimisation step, and the per-batch loop body around it.

Kept apart from the epoch loop so the throughput benchmark times exactly the code a real run executes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daft_core.augment import AugmentConfig, augment_batch
from daft_core.training.config import FinetuneConfig, NonFiniteLossError

__all__ = ["StepContext", "autocast", "current_lrs", "make_step_context", "run_train_steps", "train_step"]


@dataclass
class StepContext:
    """Everything one optimisation step needs; built once per run so the step itself stays branch-free."""

    module: nn.Module  # the (possibly compiled) module called in the step
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]  # trainable parameters (for grad clipping)
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    compiled_cudagraphs: bool = False


def make_step_context(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: FinetuneConfig,
    device: torch.device,
    *,
    data_parallel: bool = False,
) -> StepContext:
    """Resolve amp / channels-last / compile for ``device`` (also used by the throughput benchmark).

    ``data_parallel``: the step calls the model through DistributedDataParallel (an initialised process
    group), which averages gradients over ranks in backward; compile, if on, wraps that.
    """
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (config.amp == "bf16" or (config.amp == "auto" and cuda)) else None
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and cuda)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    module = model
    if data_parallel:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    use_compile = config.compile
    # CUDA graphs ("reduce-overhead") exist only on CUDA; CPU gets inductor's default mode.
    cudagraphs = use_compile and cuda and "reduce-overhead" in config.compile_mode
    if use_compile:
        if not cuda:
            _check_cpu_compiler()
        mode = config.compile_mode if cuda or config.compile_mode != "reduce-overhead" else None
        module = torch.compile(module, mode=mode)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return StepContext(
        module=module,
        optimizer=optimizer,
        params=params,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        label_smoothing=config.label_smoothing,
        grad_clip=config.grad_clip,
        compiled_cudagraphs=cudagraphs,
    )


def _check_cpu_compiler() -> None:
    """torch.compile on CPU builds C++ kernels (inductor): fail at set-up, not mid-epoch, without one."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # private API moved: let torch.compile report it
        return
    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's own "no C++ compiler" error
        raise ValueError(
            f"compile=True on CPU needs a C++ compiler for torch.compile (inductor): {e}; install g++ "
            "(or set CXX) or set finetune.compile to false"
        ) from e


def autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
    """The step's autocast, shared with validation so both see the same numerics."""
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype)


def train_step(
    ctx: StepContext, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a float [0,1] batch already on the device. Returns (loss, #correct) as device
    tensors, without synchronising, so the host can queue the next step while this one runs."""
    if ctx.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if ctx.compiled_cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(ctx):
        logits = ctx.module(images)
    # Loss outside the compiled graph, in fp32: its output must outlive the next cudagraph replay.
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=ctx.label_smoothing)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(ctx.params, ctx.grad_clip)
    ctx.optimizer.step()
    correct = (logits.detach().argmax(dim=1) == labels).sum()
    return loss.detach(), correct


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """[head lr, backbone lr] from the named param groups (0 when the backbone is frozen)."""
    lr = {g.get("name"): float(g["lr"]) for g in optimizer.param_groups}
    return [lr.get("head", 0.0), lr.get("backbone", 0.0)]


def _check_finite(pending: tuple[torch.Tensor, int, int, list[float]] | None) -> None:
    """Raise for a step whose loss is NaN/inf. Checked one step late so the device never idles."""
    if pending is None:
        return
    loss, epoch, step, lrs = pending
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(
            f"non-finite training loss ({float(loss)}) at epoch {epoch}, step {step} "
            f"(lr_head={lrs[0]:g}, lr_backbone={lrs[1]:g}); lower the learning rates or check the inputs"
        )


def run_train_steps(
    ctx: StepContext,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    augment: AugmentConfig,
    size: int | tuple[int, int],
    generator: torch.Generator | None,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    epoch: int = 1,
    progress: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The fine-tuning loop body (also what the throughput benchmark times): device augmentation, one
    `train_step`, the per-step lr schedule, and a one-step-late finiteness check, per uint8 batch.

    Returns (summed loss, #correct) as device tensors and the number of images, without a final sync.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    n = 0
    pending = None
    for step, (x_uint8, y) in enumerate(batches, start=1):
        x = augment_batch(x_uint8, augment, size, generator)
        lrs = current_lrs(ctx.optimizer)
        loss, batch_correct = train_step(ctx, x, y)
        if scheduler is not None:
            scheduler.step()
        _check_finite(pending)
        pending = (loss, epoch, step, lrs)
        loss_sum += loss.double() * len(y)
        correct += batch_correct
        n += len(y)
        if progress is not None:
            progress.update(1)
    _check_finite(pending)
    return loss_sum, correct, n
