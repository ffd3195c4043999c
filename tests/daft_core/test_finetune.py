"""Behaviour of the one fine-tuning loop: what each recipe may change, reproducibility, resume, safety.

Uses a tiny conv net with BatchNorm and 32 synthetic 8x8 images, so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daft_core.augment import AugmentConfig, augment_batch, to_float_resized
from daft_core.methods import get_recipe
from daft_core.training import (
    CheckpointMismatchError,
    FinetuneConfig,
    FinetuneResult,
    NonFiniteLossError,
    finetune,
)

# importlib: daft_core re-exports a function named `finetune`; the loop module looks up `_evaluate`
ft_module = importlib.import_module("daft_core.training.loop")

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Stand-in for DaftModel: same surface (backbone, head, features, preprocess, input_size, reset_head)."""

    def __init__(self, input_size: int = 8) -> None:
        super().__init__()
        self.input_size = input_size
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, NUM_CLASSES)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True)
        return (x - 0.5) / 0.25

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def reset_head(self, init: str, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if init == "zero":
                self.head.weight.zero_()
                self.head.bias.zero_()
            else:
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * 0.1)
                self.head.bias.zero_()


@dataclass
class Images:
    """ImageSet-like: uint8 (N, C, H, W) images, int64 labels."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]


def make_set(n: int, seed: int, channels: int = 3, size: int = 8) -> Images:
    """Learnable toy data: class c has a bright band at rows 2c..2c+1, on top of noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    images = torch.randint(0, 100, (n, channels, size, size), generator=g)
    for i, c in enumerate(labels.tolist()):
        images[i, :, 2 * c : 2 * c + 2, :] += 150
    return Images("toy", images.to(torch.uint8), labels.to(torch.int64), [str(c) for c in range(NUM_CLASSES)])


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: intra-op threads only add contention (20x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[Images, Images]:
    return make_set(32, seed=1), make_set(24, seed=2)


@pytest.fixture(scope="module")
def pretrained(_single_thread: None) -> TinyNet:
    """A 'pretrained' model: a few plain train-mode steps give it non-trivial BN running statistics."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = make_set(48, seed=3).images
    y = make_set(48, seed=3).labels
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def cfg(**kw: Any) -> FinetuneConfig:
    base = {"epochs": 2, "batch_size": 8, "eval_batch_size": 16, "seed": 0, "device": "cpu"}
    return FinetuneConfig(**{**base, **kw})


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 4}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(not torch.equal(a[k], b[k]) for k in a)


def run(model: nn.Module, data: tuple[Images, Images], recipe: str, config=None, **kw: Any) -> FinetuneResult:
    train, val = data
    recipe_kw = kw.pop("recipe_kw", {})
    return finetune(model, train, val, get_recipe(recipe, **recipe_kw), config or cfg(), **kw)


def untimed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in history]


# --------------------------------------------------------------------------------- what each recipe changes


def test_lp_trains_only_the_head(pretrained: TinyNet, data) -> None:
    model = copy.deepcopy(pretrained)
    before, head_before = backbone_state(model), model.head.weight.detach().clone()
    result = run(model, data, "lp")
    assert same(backbone_state(result.model), before)  # incl. running stats and num_batches_tracked
    assert not torch.equal(result.model.head.weight, head_before)
    assert all(p.requires_grad for p in result.model.parameters())  # caller's flags restored
    assert [r["lr_backbone"] for r in result.history] == [0.0, 0.0]


def test_lp_ft_starts_from_probe_and_keeps_bn_statistics(pretrained: TinyNet, data) -> None:
    probe = nn.Linear(8, NUM_CLASSES)
    start = run(copy.deepcopy(pretrained), data, "lp_ft", cfg(epochs=0), probe_head=probe)
    assert torch.equal(start.model.head.weight, probe.weight) and torch.equal(
        start.model.head.bias, probe.bias
    )

    model = copy.deepcopy(pretrained)
    stats, convs = bn_buffers(model), conv_weights(model)
    result = run(model, data, "lp_ft", probe_head=probe)
    assert same(bn_buffers(result.model), stats)  # BN in eval mode: running stats frozen
    assert all_differ(conv_weights(result.model), convs)  # ...while the weights are trained


def test_lp_ft_without_probe_head_explains_what_to_do(pretrained: TinyNet, data) -> None:
    with pytest.raises(ValueError, match="run linear probing first"):
        run(copy.deepcopy(pretrained), data, "lp_ft")


@pytest.mark.parametrize("recipe", ["ft", "daft", "daft_bn_only", "daft_fast_head_only"])
def test_full_finetuning_recipes_change_backbone_and_running_stats(
    recipe: str, pretrained: TinyNet, data
) -> None:
    """Every full fine-tuning recipe trains the backbone; running statistics move in train-mode BN, or
    by the conversion (daft_bn_only), and stay put in eval-mode BN without one (daft_fast_head_only)."""
    model = copy.deepcopy(pretrained)
    stats, convs = bn_buffers(model), conv_weights(model)
    result = run(model, data, recipe)
    r = get_recipe(recipe)
    if r.bn_mode == "train" or r.convert_bn:
        assert all_differ(bn_buffers(result.model), stats)
    else:
        after = bn_buffers(result.model)
        assert all(torch.equal(after[k], v) for k, v in stats.items())
    assert all_differ(conv_weights(result.model), convs)
    assert math.isfinite(result.history[-1]["train_loss"])


def test_daft_converts_bn_and_zeroes_head_before_training(pretrained: TinyNet, data) -> None:
    from daft_core.bn_conversion import convert_batchnorm

    train, _ = data
    expected = copy.deepcopy(pretrained)
    convert_batchnorm(expected, train.images.split(8), stats="batch_mean")  # training batch size

    result = run(copy.deepcopy(pretrained), data, "daft", cfg(epochs=0))
    assert result.conversion_report is not None and result.conversion_report["num_samples"] == 32
    for key, value in bn_buffers(expected).items():
        torch.testing.assert_close(result.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        bn_buffers(result.model)["backbone.1.running_mean"], pretrained.backbone[1].running_mean
    )
    assert (
        torch.count_nonzero(result.model.head.weight) == 0
        and torch.count_nonzero(result.model.head.bias) == 0
    )
    assert result.best_epoch == 0 and result.history == []


@pytest.mark.parametrize(
    ("recipe", "converts"), [("ft", False), ("daft_fast_head_only", False), ("daft_bn_only", True)]
)
def test_conversion_only_when_recipe_asks(recipe: str, converts: bool, pretrained: TinyNet, data) -> None:
    result = run(copy.deepcopy(pretrained), data, recipe, cfg(epochs=0))
    assert (result.conversion_report is not None) == converts
    assert same(bn_buffers(result.model), bn_buffers(pretrained)) != converts


def test_already_converted_model_is_not_converted_again(pretrained: TinyNet, data) -> None:
    result = run(copy.deepcopy(pretrained), data, "daft", cfg(epochs=0), bn_converted=True)
    assert result.conversion_report is None
    assert same(bn_buffers(result.model), bn_buffers(pretrained))


def test_lr_schedule_is_cosine_per_step_with_two_groups(pretrained: TinyNet, data) -> None:
    result = run(copy.deepcopy(pretrained), data, "daft", cfg(epochs=3, schedule="cosine_step"))
    recipe = get_recipe("daft")
    heads = [r["lr_head"] for r in result.history]
    assert heads[0] == pytest.approx(recipe.head_lr) and heads[0] > heads[1] > heads[2] > 0
    # 4 steps/epoch, 12 in total: epoch 2 starts at step 4 -> 0.5 * (1 + cos(pi * 4 / 12))
    assert heads[1] == pytest.approx(recipe.head_lr * 0.5 * (1 + math.cos(math.pi / 3)))
    ratios = [r["lr_head"] / r["lr_backbone"] for r in result.history]
    assert ratios == pytest.approx([recipe.head_lr / recipe.backbone_lr] * 3)
    assert {
        "epoch",
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "seconds",
        "images_per_second",
    } <= set(result.history[0])


# ------------------------------------------------------------------------------- reproducibility and resume


def test_same_seed_is_bit_identical_and_global_rng_untouched(pretrained: TinyNet, data) -> None:
    rng_before = torch.get_rng_state()
    a = run(copy.deepcopy(pretrained), data, "ft")
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = run(copy.deepcopy(pretrained), data, "ft")
    c = run(copy.deepcopy(pretrained), data, "ft", cfg(seed=1))
    assert same(a.model.state_dict(), b.model.state_dict())
    assert untimed(a.history) == untimed(b.history)
    assert not same(a.model.state_dict(), c.model.state_dict())


class Killed(Exception):
    pass


def test_killed_run_resumes_to_identical_result(pretrained: TinyNet, data, tmp_path: Path) -> None:
    config = cfg(epochs=3)
    full = run(copy.deepcopy(pretrained), data, "daft", config, checkpoint_dir=tmp_path / "full")

    def kill_after_first_epoch(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            raise Killed

    with pytest.raises(Killed):
        run(
            copy.deepcopy(pretrained),
            data,
            "daft",
            config,
            checkpoint_dir=tmp_path / "b",
            callback=kill_after_first_epoch,
        )
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    seen: list[int] = []
    resumed = run(
        copy.deepcopy(pretrained),
        data,
        "daft",
        config,
        checkpoint_dir=tmp_path / "b",
        callback=lambda r: seen.append(r["epoch"]),
    )
    assert seen == [2, 3]
    assert same(resumed.model.state_dict(), full.model.state_dict())
    assert (resumed.best_epoch, resumed.best_val_accuracy) == (full.best_epoch, full.best_val_accuracy)
    assert untimed(resumed.history) == untimed(full.history)
    assert resumed.conversion_report == full.conversion_report
    last = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert same(
        last["model_state"], torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model_state"]
    )
    best = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert best["epoch"] == full.best_epoch and same(best["state_dict"], full.model.state_dict())


def test_checkpoint_of_another_run_is_refused(pretrained: TinyNet, data, tmp_path: Path) -> None:
    """With resume="must" (the default "auto" sets it aside: tests/reliability/test_resume.py)."""
    run(copy.deepcopy(pretrained), data, "ft", cfg(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"head_lr.*Delete it") as info:
        run(
            copy.deepcopy(pretrained),
            data,
            "ft",
            cfg(epochs=1),
            checkpoint_dir=tmp_path,
            recipe_kw={"head_lr": 0.5},
            resume="must",
        )
    assert "another checkpoint_dir" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match="seed"):
        run(
            copy.deepcopy(pretrained),
            data,
            "ft",
            cfg(epochs=1, seed=5),
            checkpoint_dir=tmp_path,
            resume="must",
        )


def test_finished_checkpoint_returns_the_same_result(pretrained: TinyNet, data, tmp_path: Path) -> None:
    first = run(copy.deepcopy(pretrained), data, "ft", checkpoint_dir=tmp_path)
    again = run(copy.deepcopy(pretrained), data, "ft", checkpoint_dir=tmp_path, callback=pytest.fail)
    assert same(first.model.state_dict(), again.model.state_dict())
    assert again.best_epoch == first.best_epoch


# ------------------------------------------------------------------------------------- selection and safety


@pytest.mark.parametrize(
    ("accuracies", "best"), [([0.5, 0.9, 0.7], 2), ([0.8, 0.8, 0.5], 1), ([0.1, 0.2, 0.3], 3)]
)
def test_best_val_epoch_weights_are_returned(
    accuracies: list[float], best: int, pretrained: TinyNet, data, monkeypatch, tmp_path: Path
) -> None:
    scripted = iter(accuracies)
    monkeypatch.setattr(ft_module, "_evaluate", lambda *a, **k: (1.0, next(scripted)))
    model = copy.deepcopy(pretrained)
    states: list[dict[str, torch.Tensor]] = []
    result = run(
        model,
        data,
        "ft",
        cfg(epochs=3),
        checkpoint_dir=tmp_path,
        callback=lambda r: states.append(
            backbone_state(model) | {"head.weight": model.head.weight.detach().clone()}
        ),
    )
    assert result.best_epoch == best and result.best_val_accuracy == accuracies[best - 1]
    final = result.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[best - 1].items())
    if best != 3:
        assert not torch.equal(final["head.weight"], states[-1]["head.weight"])
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == best


def test_huge_learning_rate_raises_non_finite_loss(pretrained: TinyNet, data) -> None:
    with pytest.raises(
        NonFiniteLossError,
        match=r"epoch 1, step \d+ \(lr_head=[0-9.]+e\+(29|30), lr_backbone=[0-9.]+e\+(29|30)\)",
    ):
        run(copy.deepcopy(pretrained), data, "ft", recipe_kw={"head_lr": 1e30, "backbone_lr": 1e30})


def test_non_finite_forward_raises_at_first_step(pretrained: TinyNet, data) -> None:
    model = copy.deepcopy(pretrained)
    with torch.no_grad():
        model.backbone[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1 ") as info:
        run(model, data, "ft")
    assert isinstance(info.value, RuntimeError) and "lr_head" in str(info.value)


def test_one_channel_images_and_config_roundtrip(data) -> None:
    train, val = (make_set(16, seed=s, channels=1, size=12) for s in (4, 5))
    result = finetune(TinyNet(), train, val, get_recipe("ft"), cfg(epochs=1, batch_size=4))
    assert len(result.history) == 1
    config = cfg(augment=AugmentConfig(hflip=False, scale=(0.5, 1.0)))
    assert FinetuneConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------------------------- augmentation


def test_augment_shape_range_and_determinism() -> None:
    x = make_set(6, seed=7, size=16).images
    config = AugmentConfig()
    a = augment_batch(x, config, 8, torch.Generator().manual_seed(3))
    b = augment_batch(x, config, 8, torch.Generator().manual_seed(3))
    c = augment_batch(x, config, 8, torch.Generator().manual_seed(4))
    assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    gray = augment_batch(make_set(2, seed=7, channels=1, size=16).images, config, (10, 12))
    assert gray.shape == (2, 1, 10, 12)


def test_hflip_flips_exactly_a_random_subset() -> None:
    x = make_set(32, seed=8).images
    base = to_float_resized(x, 8)
    out = augment_batch(
        x, AugmentConfig(hflip=True, random_resized_crop=False), 8, torch.Generator().manual_seed(0)
    )
    flipped = torch.tensor([torch.equal(o, b.flip(-1)) for o, b in zip(out, base, strict=True)])
    kept = torch.tensor([torch.equal(o, b) for o, b in zip(out, base, strict=True)])
    assert bool((flipped | kept).all()) and 0 < int(flipped.sum()) < 32


def test_full_crop_without_flip_is_identity_and_no_aug_is_eval_transform() -> None:
    x = make_set(4, seed=9).images
    ident = AugmentConfig(hflip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(
        augment_batch(x, ident, 8, torch.Generator()), x.float() / 255, atol=1e-5, rtol=0
    )
    off = AugmentConfig(hflip=False, random_resized_crop=False)
    assert torch.equal(augment_batch(x, off, 6), to_float_resized(x, 6))


def test_crop_zooms_in() -> None:
    """A small-scale crop of a left-right gradient spans a narrower value range than the full image."""
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8).expand(8, 1, 16, 16).contiguous()
    out = augment_batch(
        ramp, AugmentConfig(hflip=False, scale=(0.1, 0.1)), 16, torch.Generator().manual_seed(0)
    )
    spans = out[:, 0, 8, -1] - out[:, 0, 8, 0]
    assert bool((spans > 0).all()) and bool((spans < 0.6).all())


def test_bad_augment_config_raises() -> None:
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        AugmentConfig(ratio=(2.0, 1.0))


# ------------------------------------------------------------------------------ with the real collaborators


def test_real_daft_model_and_imageset_resume_bit_identically(tmp_path: Path) -> None:
    """Same contract with the project's DaftModel (its reset_head, preprocess) and ImageSet (1-channel)."""
    models = pytest.importorskip("daft_core.models")
    data_mod = pytest.importorskip("daft_core.data")

    def as_imageset(s: Images) -> Any:
        return data_mod.ImageSet(s.name, s.images, s.labels, s.class_names)

    train, val = (as_imageset(make_set(24, seed=s, channels=1, size=8)) for s in (10, 11))
    torch.manual_seed(0)
    initial = models.DaftModel(TinyNet().backbone, num_features=8, num_classes=NUM_CLASSES, input_size=8)
    config = cfg(epochs=2)

    def go(callback=None, where: str = "a") -> FinetuneResult:
        return finetune(
            copy.deepcopy(initial), train, val, get_recipe("daft_bn_only"), config,
            checkpoint_dir=tmp_path / where, callback=callback,
        )  # fmt: skip

    full = go()

    def kill(record: dict[str, Any]) -> None:
        raise Killed

    with pytest.raises(Killed):
        go(kill, "b")
    resumed = go(None, "b")
    assert same(resumed.model.state_dict(), full.model.state_dict())
    assert not torch.equal(full.model.head.weight, initial.head.weight)  # random re-init + training
