"""The one fine-tuning loop behind every method (FT, LP, LP-FT, DAFT and its ablations).

A method is a `Recipe` (data); this module only knows how to apply a recipe: optional BN conversion, head
initialisation, two SGD parameter groups under one cosine schedule, BN train/eval mode, best-ID-val
selection, and atomic, resumable checkpoints. On CPU a run is bit-reproducible from its seed, and a killed
run resumed from ``checkpoint_dir/last.pt`` ends with exactly the weights an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from daft_core.augment import AugmentConfig, augment_batch, to_float_resized
from daft_core.recipes import Recipe

__all__ = [
    "CheckpointMismatchError",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteLossError",
    "StepContext",
    "finetune",
    "make_step_context",
    "run_train_steps",
    "train_step",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
LAST_NAME, BEST_NAME = "last.pt", "best.pt"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; continuing would only corrupt the weights."""


class CheckpointMismatchError(ValueError):
    """``checkpoint_dir/last.pt`` belongs to a different run (recipe, config, data or model)."""


@dataclass(frozen=True)
class FinetuneConfig:
    """Loop hyper-parameters shared by every recipe (the learning rates live in the `Recipe`).

    ``amp``/``channels_last``: "auto" turns bf16 autocast (training and per-epoch validation) / channels-last
    on for CUDA only (CPU stays fp32 and bit-reproducible). ``compile`` wraps the model in
    ``torch.compile(mode=compile_mode)`` on CUDA (ignored on CPU).
    ``drop_last`` drops a ragged final training batch (fixed shapes for compiled graphs, no size-1 BN
    batches) unless the training set is smaller than one batch.
    """

    epochs: int = 10
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
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

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("FinetuneConfig: epochs must be >= 0 and batch sizes >= 1")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("FinetuneConfig: need 0 <= momentum < 1, weight_decay >= 0, warmup_epochs >= 0")
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
        d = dict(d)
        if isinstance(d.get("augment"), Mapping):
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        return cls(**d)


@dataclass
class FinetuneResult:
    """``model`` holds the best-ID-val weights; ``best_epoch`` is 1-based (0: no epoch was run)."""

    model: nn.Module
    best_epoch: int
    best_val_accuracy: float
    history: list[dict[str, Any]]
    conversion_report: dict[str, Any] | None


# --------------------------------------------------------------------------------------------- step


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
    model: nn.Module, optimizer: torch.optim.Optimizer, config: FinetuneConfig, device: torch.device
) -> StepContext:
    """Resolve amp / channels-last / compile for ``device`` (also used by the throughput benchmark)."""
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (config.amp == "bf16" or (config.amp == "auto" and cuda)) else None
    channels_last = config.channels_last == "on" or (config.channels_last == "auto" and cuda)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    module = model
    use_compile = config.compile and cuda
    if use_compile:
        module = torch.compile(model, mode=config.compile_mode)
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
        compiled_cudagraphs=use_compile and "reduce-overhead" in config.compile_mode,
    )


def _autocast(ctx: StepContext) -> contextlib.AbstractContextManager:
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
    with _autocast(ctx):
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


# --------------------------------------------------------------------------------------------- setup


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"FinetuneConfig.device={name!r} but CUDA is not available")
    return device


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _batches(
    ds: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from daft_core.data import iterate_batches  # lazy: keeps this module importable on its own

    return iterate_batches(
        ds, batch_size, shuffle=shuffle, generator=generator, device=device, drop_last=drop_last
    )


def _head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} must expose its classifier as `.head: nn.Linear`")
    return head


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head params, backbone params): everything that is not the head counts as backbone."""
    head_ids = {id(p) for p in _head(model).parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return list(_head(model).parameters()), backbone


def _probe_weights(probe_head: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(probe_head, nn.Linear):
        return probe_head.weight.detach(), probe_head.bias.detach()
    if isinstance(probe_head, Mapping) and "weight" in probe_head and "bias" in probe_head:
        return torch.as_tensor(probe_head["weight"]), torch.as_tensor(probe_head["bias"])
    raise TypeError("probe_head must be an nn.Linear or a mapping with 'weight' and 'bias'")


def _init_head(model: nn.Module, recipe: Recipe, probe_head: Any, seed: int) -> None:
    """Set the head as the recipe says: zero, a fresh seeded random init, or the linear-probe solution."""
    head = _head(model)
    if recipe.head_init == "zero":
        with torch.no_grad():
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
    elif recipe.head_init == "random":
        generator = torch.Generator().manual_seed(seed + 2)
        if hasattr(model, "reset_head"):
            with torch.no_grad():
                model.reset_head("random", generator=generator)
        else:
            _reset_linear(head, generator)
    else:
        weight, bias = _probe_weights(probe_head)
        if weight.shape != head.weight.shape or (head.bias is not None and bias.shape != head.bias.shape):
            raise ValueError(
                f"probe_head shape {tuple(weight.shape)} does not match the model head "
                f"{tuple(head.weight.shape)} (num_classes x num_features)"
            )
        with torch.no_grad():
            head.weight.copy_(weight)
            if head.bias is not None:
                head.bias.copy_(bias)


def _reset_linear(head: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)), drawn from ``generator`` on the CPU."""
    bound = 1.0 / math.sqrt(head.in_features)
    with torch.no_grad():
        w = torch.empty(head.weight.shape).uniform_(-bound, bound, generator=generator)
        head.weight.copy_(w)
        if head.bias is not None:
            head.bias.copy_(torch.empty(head.bias.shape).uniform_(-bound, bound, generator=generator))


def _set_train_mode(model: nn.Module, recipe: Recipe) -> None:
    """model.train(), then BN layers back to eval for recipes that keep running statistics frozen."""
    model.train()
    if recipe.bn_mode == "eval":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 0 over ``total_steps`` (per optimisation step)."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _input_size(model: nn.Module, ds: Any) -> int | tuple[int, int]:
    size = getattr(model, "input_size", None)
    return int(size) if size is not None else tuple(ds.images.shape[-2:])


# --------------------------------------------------------------------------------------------- checkpoint


def _fingerprint_data(
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
        "head": list(_head(model).weight.shape),
    }


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temp file in the same directory, then os.replace: a kill never leaves a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


@dataclass
class _RunState:
    """Mutable loop state that a checkpoint must carry."""

    epoch: int = 0  # completed epochs
    best_epoch: int = 0
    best_val_accuracy: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Gens:
    shuffle: torch.Generator
    augment: torch.Generator


def _rng_states(gens: _Gens, device: torch.device) -> dict[str, torch.Tensor]:
    states = {
        "torch_cpu": torch.get_rng_state(),
        "shuffle": gens.shuffle.get_state(),
        "augment": gens.augment.get_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(_cuda_index(device))
    return states


def _restore_rng(states: Mapping[str, torch.Tensor], gens: _Gens, device: torch.device) -> None:
    torch.set_rng_state(states["torch_cpu"])
    gens.shuffle.set_state(states["shuffle"])
    gens.augment.set_state(states["augment"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], _cuda_index(device))


def _save_last(path: Path, **payload: Any) -> None:
    _atomic_save({"format": CHECKPOINT_FORMAT, **payload}, path)


def _load_last(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Load ``last.pt`` and refuse it when it belongs to another run."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    stored = ckpt.get("fingerprint_data", {})
    if ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("fingerprint") != _digest(fingerprint):
        diff = _diff(stored, fingerprint)
        raise CheckpointMismatchError(
            f"{path} was written by a different run (differs in: {diff or 'checkpoint format'}). "
            "Delete it to start over, or pass another checkpoint_dir."
        )
    return ckpt


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# --------------------------------------------------------------------------------------------- loop


@torch.no_grad()
def _evaluate(
    model: nn.Module, ds: Any, config: FinetuneConfig, ctx: StepContext, size: Any
) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode without augmentation."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    n = 0
    for x, y in _batches(ds, config.eval_batch_size, device=ctx.device):
        x = to_float_resized(x, size)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(ctx):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        n += len(y)
    n = max(n, 1)
    return float(loss_sum) / n, int(correct) / n


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


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return None
    return tqdm(total=total, desc=desc, disable=None, leave=False)


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """[head lr, backbone lr] from the named param groups (0 when the backbone is frozen)."""
    lr = {g.get("name"): float(g["lr"]) for g in optimizer.param_groups}
    return [lr.get("head", 0.0), lr.get("backbone", 0.0)]


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
        lrs = _lrs(ctx.optimizer)
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


def _train_epoch(
    epoch: int,
    model: nn.Module,
    train: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    ctx: StepContext,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: _Gens,
    size: Any,
    drop_last: bool,
    steps: int,
) -> tuple[float, float, int]:
    """One shuffled pass over ``train``: (mean loss, accuracy, #images)."""
    _set_train_mode(model, recipe)
    batches = _batches(
        train, config.batch_size, shuffle=True, generator=gens.shuffle, device=ctx.device, drop_last=drop_last
    )
    bar = _progress(steps, f"{recipe.name} epoch {epoch}")
    try:
        loss_sum, correct, n = run_train_steps(
            ctx, batches, config.augment, size, gens.augment, scheduler=scheduler, epoch=epoch, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    n_safe = max(n, 1)
    return float(loss_sum) / n_safe, int(correct) / n_safe, n


def _convert(
    model: nn.Module, train: Any, config: FinetuneConfig, device: torch.device, drop_last: bool
) -> dict:
    """DAFT's BN conversion on ID-train batches of the *training* batch size: batch-mean statistics depend
    on it, and they should match what train-mode BN will see."""
    from daft_core.bn_conversion import convert_batchnorm  # lazy: optional collaborator module

    batches = (x for x, _ in _batches(train, config.batch_size, device=device, drop_last=drop_last))
    report = convert_batchnorm(model, batches, stats="batch_mean")
    logger.info("BN conversion on %d ID-train images: %d layers", report.num_samples, len(report.layers))
    return report.to_dict()


def _build_optimizer(
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


def _validate_inputs(recipe: Recipe, probe_head: Any, train: Any, val: Any) -> None:
    if recipe.head_init == "probe" and probe_head is None:
        raise ValueError(
            f"recipe {recipe.name!r} initialises the head from a linear probe, but probe_head is None: "
            "run linear probing first (daft_core.probe.fit_linear_probe / the linear_probe step) and pass "
            "its head as probe_head"
        )
    if len(train.labels) == 0 or len(val.labels) == 0:
        raise ValueError("finetune needs non-empty train and val sets")


def finetune(
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    *,
    probe_head: nn.Linear | Mapping[str, torch.Tensor] | None = None,
    bn_converted: bool = False,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` (modified in place) on ``train`` with ``recipe``; select the best epoch on ``val``.

    ``train``/``val`` are ImageSets (uint8 images). With ``checkpoint_dir`` the run writes ``last.pt``
    (resumable) and ``best.pt`` after every epoch, and resumes from an existing ``last.pt`` of the same run.
    """
    _validate_inputs(recipe, probe_head, train, val)
    device = _resolve_device(config.device)
    fork_devices = [_cuda_index(device)] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):  # seed locally; leave the caller's global RNG alone
        return _finetune(
            model, train, val, recipe, config, device, probe_head, bn_converted, checkpoint_dir, callback
        )


def _finetune(
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    device: torch.device,
    probe_head: Any,
    bn_converted: bool,
    checkpoint_dir: str | os.PathLike[str] | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> FinetuneResult:
    torch.default_generator.manual_seed(config.seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(config.seed)
    fingerprint = _fingerprint_data(model, train, val, recipe, config, bn_converted)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    last_path = ckpt_dir / LAST_NAME if ckpt_dir is not None else None
    resume = _load_last(last_path, fingerprint) if last_path is not None and last_path.exists() else None

    model.to(device)
    size = _input_size(model, train)
    drop_last = config.drop_last and len(train.labels) >= config.batch_size
    conversion_report = None
    if recipe.convert_bn and not bn_converted:
        # Also on resume: conversion may change module attributes that a state_dict does not carry.
        conversion_report = _convert(model, train, config, device, drop_last)
    _init_head(model, recipe, probe_head, config.seed)

    optimizer, saved_grad_flags = _build_optimizer(model, recipe, config)
    steps = _steps_per_epoch(len(train.labels), config.batch_size, drop_last)
    warmup = round(config.warmup_epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.epochs * steps, warmup))
    gens = _Gens(
        shuffle=torch.Generator().manual_seed(config.seed),
        augment=torch.Generator(device=device).manual_seed(config.seed + 1),
    )
    state = _RunState()
    if resume is not None:
        state = _resume(resume, model, optimizer, scheduler, gens, device)
        logger.info("resuming %s from %s after epoch %d", recipe.name, last_path, state.epoch)
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
    try:
        for epoch in range(state.epoch + 1, config.epochs + 1):
            record = _run_epoch(
                epoch, model, train, val, recipe, config, ctx, scheduler, gens, size, drop_last, steps
            )
            _update_best(state, record, model)
            state.epoch = epoch
            state.history.append(record)
            if ckpt_dir is not None:
                _write_checkpoints(
                    ckpt_dir,
                    state,
                    model,
                    optimizer,
                    scheduler,
                    gens,
                    device,
                    fingerprint,
                    conversion_report,
                    recipe,
                )
            logger.info("%s epoch %d/%d: %s", recipe.name, epoch, config.epochs, _fmt(record))
            if callback is not None:
                callback(dict(record))
        return _finish(model, state, val, config, ctx, size, conversion_report, resume)
    finally:
        for p, flag in saved_grad_flags:
            p.requires_grad_(flag)
        model.to(memory_format=torch.contiguous_format)


def _run_epoch(
    epoch: int,
    model: nn.Module,
    train: Any,
    val: Any,
    recipe: Recipe,
    config: FinetuneConfig,
    ctx: StepContext,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: _Gens,
    size: Any,
    drop_last: bool,
    steps: int,
) -> dict[str, Any]:
    lrs = _lrs(ctx.optimizer)
    start = time.perf_counter()
    train_loss, train_acc, n = _train_epoch(
        epoch, model, train, recipe, config, ctx, scheduler, gens, size, drop_last, steps
    )
    train_seconds = time.perf_counter() - start
    val_loss, val_acc = _evaluate(model, val, config, ctx, size)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr_head": lrs[0],  # lr at the start of the epoch (cosine decays within it)
        "lr_backbone": lrs[1],
        "seconds": time.perf_counter() - start,
        "images_per_second": n / max(train_seconds, 1e-9),
    }


def _fmt(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _update_best(state: _RunState, record: Mapping[str, Any], model: nn.Module) -> None:
    """Keep the best-ID-val weights; ties keep the earlier epoch."""
    if state.best_state is None or record["val_accuracy"] > state.best_val_accuracy:
        state.best_epoch = int(record["epoch"])
        state.best_val_accuracy = float(record["val_accuracy"])
        state.best_state = _cpu_state(model)


def _write_checkpoints(
    ckpt_dir: Path,
    state: _RunState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: _Gens,
    device: torch.device,
    fingerprint: dict[str, Any],
    conversion_report: dict[str, Any] | None,
    recipe: Recipe,
) -> None:
    """best.pt first, then last.pt, so a kill between the two never loses the best weights."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if state.best_epoch == state.epoch:
        best = {
            "format": CHECKPOINT_FORMAT,
            "state_dict": state.best_state,
            "epoch": state.best_epoch,
            "val_accuracy": state.best_val_accuracy,
            "recipe": recipe.to_dict(),
            "fingerprint": _digest(fingerprint),
        }
        _atomic_save(best, ckpt_dir / BEST_NAME)
    _save_last(
        ckpt_dir / LAST_NAME,
        fingerprint=_digest(fingerprint),
        fingerprint_data=fingerprint,
        epoch=state.epoch,
        model_state=_cpu_state(model),
        optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(),
        rng=_rng_states(gens, device),
        best_state=state.best_state,
        best_epoch=state.best_epoch,
        best_val_accuracy=state.best_val_accuracy,
        history=state.history,
        conversion_report=conversion_report,
    )


def _resume(
    ckpt: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    gens: _Gens,
    device: torch.device,
) -> _RunState:
    model.load_state_dict(ckpt["model_state"])
    optimizer.load_state_dict(ckpt["optimizer_state"])
    scheduler.load_state_dict(ckpt["scheduler_state"])
    _restore_rng(ckpt["rng"], gens, device)
    return _RunState(
        epoch=int(ckpt["epoch"]),
        best_epoch=int(ckpt["best_epoch"]),
        best_val_accuracy=float(ckpt["best_val_accuracy"]),
        best_state=ckpt["best_state"],
        history=[dict(r) for r in ckpt["history"]],
    )


def _finish(
    model: nn.Module,
    state: _RunState,
    val: Any,
    config: FinetuneConfig,
    ctx: StepContext,
    size: Any,
    conversion_report: dict[str, Any] | None,
    resume: Mapping[str, Any] | None,
) -> FinetuneResult:
    """Load the best weights (or, with 0 epochs, score the initial ones) and package the result."""
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
        best_acc = state.best_val_accuracy
    else:
        best_acc = _evaluate(model, val, config, ctx, size)[1]
    if conversion_report is None and resume is not None:
        conversion_report = resume.get("conversion_report")
    model.eval()
    return FinetuneResult(
        model=model,
        best_epoch=state.best_epoch,
        best_val_accuracy=best_acc,
        history=copy.deepcopy(state.history),
        conversion_report=conversion_report,
    )
