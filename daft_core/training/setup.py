"""Applying a recipe before the first step: head init, BN conversion, parameter groups, BN mode, schedule.

Each helper is one decision a `Recipe` field makes, so the loop itself never branches on the method.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from daft_core.recipes import Recipe
from daft_core.training.config import FinetuneConfig

logger = logging.getLogger(__name__)


def cuda_index(device: torch.device) -> int:
    """The concrete CUDA ordinal: RNG fork/save calls need one even for a bare ``cuda`` device."""
    return device.index if device.index is not None else torch.cuda.current_device()


def batches(
    ds: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`iterate_batches`, imported lazily so the package imports without the data layer."""
    from daft_core.data import iterate_batches

    return iterate_batches(
        ds, batch_size, shuffle=shuffle, generator=generator, device=device, drop_last=drop_last
    )


def validate_inputs(recipe: Recipe, probe_head: Any, train: Any, val: Any) -> None:
    """Fail before any work with a message that says what to do."""
    if recipe.head_init == "probe" and probe_head is None:
        raise ValueError(
            f"recipe {recipe.name!r} initialises the head from a linear probe, but probe_head is None: "
            "run linear probing first (daft_core.probe.fit_linear_probe / the linear_probe step) and pass "
            "its head as probe_head"
        )
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise ValueError("finetune needs non-empty train and val sets")


def head(model: nn.Module) -> nn.Linear:
    """The classifier: the loop relies on ``.head`` only, so any model exposing it can be fine-tuned."""
    linear = getattr(model, "head", None)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{type(model).__name__} must expose its classifier as `.head: nn.Linear`")
    return linear


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head params, backbone params): everything that is not the head counts as backbone."""
    head_ids = {id(p) for p in head(model).parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return list(head(model).parameters()), backbone


def probe_weights(probe_head: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(probe_head, nn.Linear):
        return probe_head.weight.detach(), probe_head.bias.detach()
    if isinstance(probe_head, Mapping) and "weight" in probe_head and "bias" in probe_head:
        return torch.as_tensor(probe_head["weight"]), torch.as_tensor(probe_head["bias"])
    raise TypeError("probe_head must be an nn.Linear or a mapping with 'weight' and 'bias'")


def init_head(model: nn.Module, recipe: Recipe, probe_head: Any, seed: int) -> None:
    """Set the head as the recipe says: zero, a fresh seeded random init, or the linear-probe solution."""
    linear = head(model)
    if recipe.head_init == "zero":
        with torch.no_grad():
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
    elif recipe.head_init == "random":
        generator = torch.Generator().manual_seed(seed + 2)
        if hasattr(model, "reset_head"):
            with torch.no_grad():
                model.reset_head("random", generator=generator)
        else:
            _reset_linear(linear, generator)
    else:
        weight, bias = probe_weights(probe_head)
        if weight.shape != linear.weight.shape or (
            linear.bias is not None and bias.shape != linear.bias.shape
        ):
            raise ValueError(
                f"probe_head shape {tuple(weight.shape)} does not match the model head "
                f"{tuple(linear.weight.shape)} (num_classes x num_features)"
            )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.copy_(bias)


def _reset_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)), drawn from ``generator`` on the CPU."""
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        w = torch.empty(linear.weight.shape).uniform_(-bound, bound, generator=generator)
        linear.weight.copy_(w)
        if linear.bias is not None:
            linear.bias.copy_(torch.empty(linear.bias.shape).uniform_(-bound, bound, generator=generator))


def convert_bn(
    model: nn.Module,
    train: Any,
    config: FinetuneConfig,
    device: torch.device,
    drop_last: bool,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """DAFT's BN conversion on ID-train batches of the *training* batch size: batch-mean statistics depend
    on it, and they should match what train-mode BN will see.

    Under torch.distributed rank ``r`` measures batches ``r, r+W, ...`` of the same unshuffled sequence and
    `convert_batchnorm` all-reduces the sums, so every rank gets the statistics one process would.
    """
    from daft_core.bn_conversion import convert_batchnorm  # lazy: optional collaborator module

    all_batches = batches(train, config.batch_size, device=device, drop_last=drop_last)
    shard = itertools.islice(all_batches, rank, None, world_size) if world_size > 1 else all_batches
    images = (x for x, _ in shard)
    report = convert_batchnorm(model, images, stats="batch_mean")
    logger.info("BN conversion on %d ID-train images: %d layers", report.num_samples, len(report.layers))
    return report.to_dict()


def build_optimizer(
    model: nn.Module, recipe: Recipe, config: FinetuneConfig
) -> tuple[torch.optim.Optimizer, list[tuple[nn.Parameter, bool]]]:
    """SGD with a head group and (if trained) a backbone group; frozen params get requires_grad=False.

    Returns the optimizer and the original requires_grad flags, restored when the run ends.
    """
    head_params, backbone_params = _split_params(model)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    groups = [{"params": head_params, "lr": recipe.head_lr, "name": "head"}]
    if recipe.train_backbone:
        groups.append({"params": backbone_params, "lr": recipe.backbone_lr, "name": "backbone"})
    else:
        for p in backbone_params:
            p.requires_grad_(False)
    optimizer = torch.optim.SGD(
        groups,
        lr=recipe.head_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    return optimizer, saved


def lr_lambda(
    schedule: str, epochs: int, steps_per_epoch: int, warmup_steps: int = 0
) -> Callable[[int], float]:
    """The lr factor of optimisation step ``step`` (0-based): linear warm-up, then cosine decay to 0.

    ``"cosine_epoch"`` (the paper's ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch) holds
    ``0.5 * (1 + cos(pi * e / epochs))`` through 0-based epoch ``e``; ``"cosine_step"`` decays per step
    over the steps after the warm-up. A `LambdaLR` stepped per step either way, so the checkpointed
    scheduler state is the same kind for both.
    """
    steps = max(1, steps_per_epoch)
    total = epochs * steps

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine_epoch":
            progress = (step // steps) / max(1, epochs)
        else:
            progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def set_train_mode(model: nn.Module, recipe: Recipe) -> None:
    """model.train(), then BN layers back to eval for recipes that keep running statistics frozen."""
    model.train()
    if recipe.bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def check_sync_bn(sync_bn: bool, device: torch.device, world_size: int) -> None:
    """SyncBatchNorm has CUDA kernels only (torch refuses it on CPU): say so before any work."""
    if sync_bn and world_size > 1 and device.type != "cuda":
        raise ValueError(
            f"sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU implementation), but this run "
            f"trains on {device}: set sync_bn false for CPU runs (each rank then normalises its own batch)"
        )


def to_sync_bn(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every BN layer for a SyncBatchNorm sharing its parameters (statistics over the global batch).

    Returns ``(parent, name, original)`` for `undo_sync_bn`: the caller gets its own layer types back.
    """
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swaps.append((parent, name, child))
    return swaps


def undo_sync_bn(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put the original BN layers back, carrying the trained state over."""
    for parent, name, original in swaps:
        sync = getattr(parent, name)
        original.load_state_dict(sync.state_dict())
        original.train(sync.training)
        setattr(parent, name, original)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool, world_size: int = 1) -> int:
    """Optimisation steps per epoch; with several ranks a step takes ``world_size * batch_size`` images
    and a ragged last global batch is always dropped (see `distributed.shard_batches`)."""
    if world_size > 1:
        return n // (batch_size * world_size)
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def input_size(model: nn.Module, ds: Any) -> int | tuple[int, int]:
    """The model's own input size when it declares one, else the data's (plain nn.Modules)."""
    size = getattr(model, "input_size", None)
    return int(size) if size is not None else tuple(ds.images.shape[-2:])
