"""The one fine-tuning loop behind every method (FT, LP, LP-FT, DAFT and its ablations).

A method is a `Recipe` (data); the loop only applies it: set-up (`run.start_run`), then per epoch a
shuffled training pass, validation, best-ID-val selection and, with a ``checkpoint_dir``, atomic resumable
checkpoints. On CPU a run is bit-reproducible from its seed, and a killed run resumed from
``checkpoint_dir/last.pt`` ends with exactly the weights an uninterrupted run would. Only the same run
resumes: ``last.pt`` carries a fingerprint of the recipe, config, start weights and data (`checkpoint`).
Launched by torchrun (or inside an initialised process group) the same loop runs data-parallel
(`distributed`, docs/distributed.md).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daft_core.augment import to_float_resized
from daft_core.faults import kill_point
from daft_core.recipes import Recipe
from daft_core.training.checkpoint import (
    RunProgress,
    check_resume_mode,
    cpu_state,
    rng_states,
    write_checkpoints,
)
from daft_core.training.config import FinetuneConfig, FinetuneResult, ResumeMode
from daft_core.training.distributed import (
    all_gather,
    all_reduce_sum,
    broadcast_buffers,
    distributed_session,
    on_main,
    run_device,
    shard_batches,
)
from daft_core.training.run import FinetuneRun, start_run
from daft_core.training.setup import batches, cuda_index, set_train_mode, validate_inputs
from daft_core.training.step import autocast, current_lrs, run_train_steps

logger = logging.getLogger(__name__)


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
    resume: ResumeMode = "auto",
) -> FinetuneResult:
    """Fine-tune ``model`` (modified in place) on ``train`` with ``recipe``; select the best epoch on ``val``.

    ``train``/``val`` are ImageSets (uint8 images). With ``checkpoint_dir`` the run writes ``last.pt``
    (resumable) and ``best.pt`` after every epoch, and resumes from an existing ``last.pt`` of the same run:
    same recipe, config (all but ``eval_batch_size``), start weights (``model`` as given, and the probe head
    of a "probe" recipe) and training/validation data. ``resume`` says what happens to a ``last.pt`` that
    belongs to another run or cannot be read (truncated, not a torch file, incomplete):

    - ``"auto"``: a warning naming the file and what differs (recipe / config / start weights / training or
      validation data) or what is wrong with it; the file (and ``best.pt``) is renamed to
      ``<name>.stale-<time>`` (only the newest such copy is kept) and the run starts fresh.
    - ``"must"``: raise `CheckpointMismatchError` (another run) or `CheckpointError` (unreadable) naming the
      file, before any training; the file is left alone. No ``last.pt`` at all still starts fresh.
    - ``"never"``: delete any ``last.pt``/``best.pt`` there and start fresh.

    Data-parallel: under torchrun (``RANK``/``WORLD_SIZE`` set; the process group is joined here and left
    at the end) or inside a process group the caller initialised, every rank calls this with the same
    arguments. ``config.batch_size`` is then per rank (a step sees ``world_size`` times as many images),
    gradients are averaged over ranks, rank 0 alone validates and writes ``checkpoint_dir``, and every rank
    gets the same result; ``callback`` runs on every rank with the same record (docs/distributed.md).
    """
    check_resume_mode(resume)
    validate_inputs(recipe, probe_head, train, val)
    with distributed_session(config.device) as dist_info:
        device = run_device(config.device, dist_info)
        fork_devices = [cuda_index(device)] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices):  # seed locally; leave the caller's RNG alone
            run = start_run(
                model,
                train,
                val,
                recipe,
                config,
                device,
                probe_head=probe_head,
                bn_converted=bn_converted,
                checkpoint_dir=checkpoint_dir,
                resume=resume,
                dist_info=dist_info,
            )
            try:
                return _fit(run, callback)
            finally:
                run.restore_caller_state()


def _fit(run: FinetuneRun, callback: Callable[[dict[str, Any]], None] | None) -> FinetuneResult:
    progress = run.progress
    for epoch in range(progress.epoch + 1, run.config.epochs + 1):
        record = _run_epoch(run, epoch)
        _update_best(progress, record, run.model)
        progress.epoch = epoch
        progress.history.append(record)
        if run.checkpoint_dir is not None:
            _write_checkpoints(run, run.checkpoint_dir)
            kill_point("training.after_epoch_checkpoint")  # fault tests: die with last.pt just written
        if run.dist.is_main:
            logger.info("%s epoch %d/%d: %s", run.recipe.name, epoch, run.config.epochs, _fmt(record))
        if callback is not None:
            callback(dict(record))
    return _finish(run)


def _write_checkpoints(run: FinetuneRun, ckpt_dir: Any) -> None:
    """Rank 0 writes (with every rank's RNG states under torch.distributed); the others wait for it."""
    d = run.dist
    rng_ranks = all_gather(rng_states(run.gens, run.device), d) if d.active else None
    on_main(lambda: write_checkpoints(run, ckpt_dir, rng_ranks), d, run.device)


def _run_epoch(run: FinetuneRun, epoch: int) -> dict[str, Any]:
    """Train one epoch; rank 0 validates and its record (the same on every rank) is returned."""
    lrs = current_lrs(run.optimizer)
    start = time.perf_counter()
    train_loss, train_acc, n = _train_epoch(run, epoch)
    train_seconds = time.perf_counter() - start
    broadcast_buffers(run.model, run.dist)  # one model everywhere: rank 0's BN running statistics

    def validate() -> dict[str, Any]:
        val_loss, val_acc = _evaluate(run, run.val)
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr_head": lrs[0],  # lr at the start of the epoch
            "lr_backbone": lrs[1],
            "seconds": time.perf_counter() - start,
            "images_per_second": n / max(train_seconds, 1e-9),  # all ranks together
            "world_size": run.dist.world_size,
        }

    return on_main(validate, run.dist, run.device)


def _train_epoch(run: FinetuneRun, epoch: int) -> tuple[float, float, int]:
    """One shuffled pass over ``run.train`` (this rank's share of it): (mean loss, accuracy, #images) over
    all ranks."""
    set_train_mode(run.model, run.recipe)
    config, d = run.config, run.dist
    if d.active:
        train_batches = shard_batches(
            run.train, config.batch_size, d, generator=run.gens.shuffle, device=run.device
        )
    else:
        train_batches = batches(
            run.train,
            config.batch_size,
            shuffle=True,
            generator=run.gens.shuffle,
            device=run.device,
            drop_last=run.drop_last,
        )
    bar = _progress(run.steps_per_epoch, f"{run.recipe.name} epoch {epoch}") if d.is_main else None
    try:
        loss_sum, correct, n = run_train_steps(
            run.ctx,
            train_batches,
            config.augment,
            run.size,
            run.gens.augment,
            scheduler=run.scheduler,
            epoch=epoch,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if d.active:
        n_here = torch.tensor(float(n), device=run.device)
        loss_sum, correct, n_all = all_reduce_sum([loss_sum, correct, n_here], d)
        n = int(n_all)
    n_safe = max(n, 1)
    return float(loss_sum) / n_safe, int(correct) / n_safe, n


@torch.no_grad()
def _evaluate(run: FinetuneRun, ds: Any) -> tuple[float, float]:
    """(mean loss, accuracy) in eval mode without augmentation."""
    model, ctx = run.model, run.ctx
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.int64, device=ctx.device)
    n = 0
    for x, y in batches(ds, run.config.eval_batch_size, device=ctx.device):
        x = to_float_resized(x, run.size)
        if ctx.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(ctx):
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(dim=1) == y).sum()
        n += len(y)
    n = max(n, 1)
    return float(loss_sum) / n, int(correct) / n


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the library
        return None
    return tqdm(total=total, desc=desc, disable=None, leave=False)


def _fmt(record: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())


def _update_best(progress: RunProgress, record: Mapping[str, Any], model: nn.Module) -> None:
    """Keep the best-ID-val weights; ties keep the earlier epoch."""
    if progress.best_state is None or record["val_accuracy"] > progress.best_val_accuracy:
        progress.best_epoch = int(record["epoch"])
        progress.best_val_accuracy = float(record["val_accuracy"])
        progress.best_state = cpu_state(model)


def _finish(run: FinetuneRun) -> FinetuneResult:
    """Load the best weights (or, with 0 epochs, score the initial ones) and package the result."""
    model, progress = run.model, run.progress
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
        best_acc = progress.best_val_accuracy
    else:
        best_acc = on_main(lambda: _evaluate(run, run.val)[1], run.dist, run.device)
    conversion_report = run.conversion_report
    if conversion_report is None:
        conversion_report = run.resumed_conversion_report
    model.eval()
    return FinetuneResult(
        model=model,
        best_epoch=progress.best_epoch,
        best_val_accuracy=best_acc,
        history=copy.deepcopy(progress.history),
        conversion_report=conversion_report,
        world_size=run.dist.world_size,
    )
