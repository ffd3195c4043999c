"""The library's defaults are the paper's, and its learning-rate schedules are what they say they are."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from daft_core.methods import get_recipe
from daft_core.training import CheckpointMismatchError, FinetuneConfig, finetune
from daft_core.training import step as step_module
from daft_core.training.setup import check_sync_bn, lr_lambda
from tests.daft_core.test_finetune import TinyNet, cfg


def test_defaults_are_the_papers() -> None:
    c = FinetuneConfig()
    assert (c.epochs, c.weight_decay, c.momentum, c.batch_size) == (20, 0.0, 0.9, 64)
    assert c.schedule == "cosine_epoch" and c.sync_bn is False


def test_old_config_dicts_load_with_the_new_fields_defaulted() -> None:
    old = FinetuneConfig(epochs=3, weight_decay=1e-4).to_dict()
    del old["schedule"], old["sync_bn"]  # what a config written before these fields looks like
    c = FinetuneConfig.from_dict(old)
    assert (c.epochs, c.weight_decay, c.schedule, c.sync_bn) == (3, 1e-4, "cosine_epoch", False)
    step = FinetuneConfig(schedule="cosine_step", sync_bn=True)
    assert FinetuneConfig.from_dict(step.to_dict()) == step


def test_unknown_schedule_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"cosine_epoch.*cosine_step.*'linear'"):
        FinetuneConfig(schedule="linear")  # type: ignore[arg-type]


def _run_lambda(f: Any, steps: int) -> list[float]:
    return [f(s) for s in range(steps)]


def test_cosine_epoch_is_torchs_cosine_annealing_stepped_per_epoch() -> None:
    epochs, per_epoch = 5, 3
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    expected = []
    for _ in range(epochs):
        expected += [opt.param_groups[0]["lr"]] * per_epoch  # constant through the epoch
        opt.step()
        torch_sched.step()
    ours = _run_lambda(lr_lambda("cosine_epoch", epochs, per_epoch), epochs * per_epoch)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[0] == 1.0 and ours[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 5)))


def test_cosine_step_decays_every_step_and_warmup_ramps_either() -> None:
    per_step = _run_lambda(lr_lambda("cosine_step", 2, 4), 8)
    assert all(a > b for a, b in itertools.pairwise(per_step))
    assert per_step[4] == pytest.approx(0.5)  # halfway: cos(pi / 2)
    warm = _run_lambda(lr_lambda("cosine_epoch", 3, 4, warmup_steps=2), 12)
    assert warm[:2] == [0.5, 1.0] and warm[2:4] == [1.0, 1.0]  # then epoch 0's value
    assert warm[4:8] == [pytest.approx(0.75)] * 4  # epoch 1: 0.5 * (1 + cos(pi / 3))


def _lrs_per_step(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the head lr every real optimisation step of the loop uses."""
    seen: list[float] = []
    original = step_module.train_step

    def spy(ctx: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
        seen.append(step_module.current_lrs(ctx.optimizer)[0])
        return original(ctx, x, y)

    monkeypatch.setattr(step_module, "train_step", spy)
    return seen


@pytest.mark.parametrize("schedule", ["cosine_epoch", "cosine_step"])
def test_the_loop_uses_the_configured_schedule(
    schedule: str, pretrained: TinyNet, data, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _lrs_per_step(monkeypatch)
    train, val = data
    finetune(copy.deepcopy(pretrained), train, val, get_recipe("ft"), cfg(epochs=3, schedule=schedule))
    base, steps = get_recipe("ft").head_lr, 4  # 32 images, batch 8
    f = lr_lambda(schedule, 3, steps)
    assert seen == pytest.approx([base * f(s) for s in range(3 * steps)])
    first_epoch = seen[:steps]
    assert (len(set(first_epoch)) == 1) == (schedule == "cosine_epoch")


class Killed(Exception):
    pass


def test_resume_continues_the_per_epoch_schedule(
    pretrained: TinyNet, data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = cfg(epochs=3, warmup_epochs=0.5)
    seen = _lrs_per_step(monkeypatch)
    train, val = data
    full = finetune(copy.deepcopy(pretrained), train, val, get_recipe("ft"), config)
    full_lrs = list(seen)
    seen.clear()

    def die(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Killed

    recipe = get_recipe("ft")
    with pytest.raises(Killed):
        finetune(copy.deepcopy(pretrained), train, val, recipe, config, checkpoint_dir=tmp_path, callback=die)
    resumed = finetune(copy.deepcopy(pretrained), train, val, recipe, config, checkpoint_dir=tmp_path)
    assert seen == full_lrs  # 4 steps before the kill, 8 after: the same lrs as without it
    sd_a, sd_b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_a_checkpoint_of_the_other_schedule_is_another_run(pretrained: TinyNet, data, tmp_path: Path) -> None:
    train, val = data
    finetune(copy.deepcopy(pretrained), train, val, get_recipe("ft"), cfg(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"schedule: 'cosine_epoch' -> 'cosine_step'"):
        finetune(
            copy.deepcopy(pretrained),
            train,
            val,
            get_recipe("ft"),
            cfg(epochs=1, schedule="cosine_step"),
            checkpoint_dir=tmp_path,
            resume="must",
        )


def test_sync_bn_on_cpu_is_refused_with_the_fix() -> None:
    check_sync_bn(True, torch.device("cpu"), 1)  # one process: nothing to synchronise, nothing refused
    check_sync_bn(False, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match=r"sync_bn needs CUDA.*set sync_bn false"):
        check_sync_bn(True, torch.device("cpu"), 2)


def test_finetune_step_passes_the_schedule_from_params() -> None:
    from components.finetune import finetune_config
    from components.params import params_from_dict
    from tests.tiny_params import tiny_params

    params = params_from_dict(tiny_params(finetune={"schedule": "cosine_step"}))
    assert finetune_config(params, "ft").schedule == "cosine_step"
    assert finetune_config(params_from_dict(tiny_params()), "ft").schedule == "cosine_epoch"
