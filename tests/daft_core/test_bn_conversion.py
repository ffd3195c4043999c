"""Behaviour of the function-preserving BatchNorm conversion."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from daft_core.bn_conversion import (
    BNConversionError,
    BNConversionReport,
    batchnorm_layers,
    convert_batchnorm,
)

torch.set_num_threads(1)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but plausible BN state, so that a conversion which ignored the old stats would fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in batchnorm_layers(model):
            c = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model


def make_batches(shape: tuple[int, ...], n: int, seed: int, scale: float = 2.0, shift: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def conv_net(bn: type[nn.Module] = nn.BatchNorm2d, **bn_kwargs) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            bn1=bn(8, **bn_kwargs),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 8, 3, padding=1),
            bn2=nn.BatchNorm2d(8),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 4),
            bn3=nn.BatchNorm1d(4),
        )
    ).double()


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3)
        self.bn = nn.BatchNorm1d(6)  # sees (N, C, L)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(-1))


def _vision(name: str) -> nn.Module:
    import torchvision  # lazily: keeps the spawned distributed workers' start-up short

    return getattr(torchvision.models, name)(weights=None, num_classes=5)


# (model factory, input shape); all in float64 so that 1e-5 holds with a wide margin.
FUNCTION_CASES = {
    "resnet18": (lambda: _vision("resnet18"), (4, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: _vision("mobilenet_v3_small"), (4, 3, 64, 64)),
    "efficientnet_b0": (lambda: _vision("efficientnet_b0"), (4, 3, 64, 64)),
    "densenet121": (lambda: _vision("densenet121"), (4, 3, 64, 64)),
    "mlp_bn1d": (
        lambda: nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)),
        (8, 10),
    ),
    "conv1d_bn1d_ncl": (Conv1dNet, (4, 3, 12)),
    "conv3d_bn3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 3), nn.BatchNorm3d(4)
        ),
        (2, 2, 6, 6, 6),
    ),
    "sync_bn": (lambda: conv_net(nn.SyncBatchNorm), (4, 3, 16, 16)),
}


@pytest.mark.parametrize("case", list(FUNCTION_CASES))
def test_eval_function_preserved(case: str) -> None:
    factory, shape = FUNCTION_CASES[case]
    torch.manual_seed(0)
    model = randomise_bn(factory()).double()
    model.train()
    batches = make_batches(shape, 2, seed=1)
    probe = make_batches(shape, 1, seed=2)[0]
    ref = eval_out(model, probe)
    old_means = [m.running_mean.clone() for _, m in batchnorm_layers(model)]
    model.train()

    report = convert_batchnorm(model, [(x, torch.zeros(len(x))) for x in batches])

    assert model.training  # original mode restored
    assert rel_err(eval_out(model, probe), ref) <= 1e-5
    moved = [
        float((m.running_mean - o).abs().max())
        for (_, m), o in zip(batchnorm_layers(model), old_means, strict=True)
    ]
    assert max(moved) > 0.1  # the conversion really changed the statistics
    assert isinstance(report, BNConversionReport)
    assert report.num_batches == 2 and report.num_samples == 2 * shape[0]
    assert len(report.layers) == len(batchnorm_layers(model))
    assert all(r.skipped is None and r.scale_min is not None for r in report.layers)
    json.dumps(report.to_dict())


def test_train_mode_matches_pretrained_eval_after_conversion() -> None:
    torch.manual_seed(0)
    model = conv_net()
    # "Pretrained": running stats are the exact (cumulative) stats of a source domain.
    for _, m in batchnorm_layers(model):
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in make_batches((16, 3, 16, 16), 4, seed=1, scale=1.0, shift=0.0):
            model(x)
    target = make_batches((16, 3, 16, 16), 3, seed=2, scale=4.0, shift=3.0)  # far from the source
    pretrained = copy.deepcopy(model)
    ref = [eval_out(pretrained, x) for x in target]

    def train_err(m: nn.Module) -> float:
        m.train()
        with torch.no_grad():
            return max(rel_err(m(x), r) for x, r in zip(target, ref, strict=True))

    converted = copy.deepcopy(model)
    convert_batchnorm(converted, target)
    err_plain, err_conv = train_err(copy.deepcopy(model)), train_err(converted)
    assert err_conv * 10 <= err_plain, (err_conv, err_plain)


def _per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


@pytest.mark.parametrize("shape_tail", [(3, 5, 5), (3, 7), (3,)])
def test_population_and_batch_mean_stats(shape_tail: tuple[int, ...]) -> None:
    bn = {3: nn.BatchNorm2d, 2: nn.BatchNorm1d, 1: nn.BatchNorm1d}[len(shape_tail)]
    g = torch.Generator().manual_seed(0)
    sizes = [2, 5, 3]
    batches = [
        torch.randn((n, *shape_tail), generator=g, dtype=torch.float64) * (i + 1) + i
        for i, n in enumerate(sizes)
    ]

    pop = nn.Sequential(bn(3)).double()
    convert_batchnorm(pop, batches, stats="population")
    mean, var = _per_channel(torch.cat(batches))
    torch.testing.assert_close(pop[0].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pop[0].running_var, var, rtol=1e-12, atol=1e-12)

    bm = nn.Sequential(bn(3)).double()
    report = convert_batchnorm(bm, batches, stats="batch_mean")
    per = [_per_channel(x) for x in batches]
    w = torch.tensor(sizes, dtype=torch.float64)[:, None] / sum(sizes)
    torch.testing.assert_close(bm[0].running_mean, (torch.stack([p[0] for p in per]) * w).sum(0))
    torch.testing.assert_close(bm[0].running_var, (torch.stack([p[1] for p in per]) * w).sum(0))
    assert report.stats == "batch_mean" and report.num_samples == sum(sizes)
    # Pooled variance also counts the spread of the batch means, so it is larger here.
    assert bool((pop[0].running_var > bm[0].running_var).all())


def test_equal_batches_give_equal_means_but_different_variances() -> None:
    batches = make_batches((4, 3, 5, 5), 3, seed=3)
    batches = [x + i for i, x in enumerate(batches)]
    pop, bm = (nn.Sequential(nn.BatchNorm2d(3)).double() for _ in range(2))
    convert_batchnorm(pop, batches, stats="population")
    convert_batchnorm(bm, batches, stats="batch_mean")
    torch.testing.assert_close(pop[0].running_mean, bm[0].running_mean)
    assert not torch.allclose(pop[0].running_var, bm[0].running_var)


# ---- distributed: two gloo ranks on CPU ---------------------------------------------------------------


def _dist_model() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(conv_net())


def _dist_batches() -> list[torch.Tensor]:
    return make_batches((4, 3, 8, 8), 4, seed=5)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        shard = _dist_batches()[rank::world]
        result = {}
        for stats in ("population", "batch_mean"):
            model = _dist_model()
            report = convert_batchnorm(model, shard, stats=stats)
            result[stats] = {"state": model.state_dict(), "num_batches": report.num_batches}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_all_reduce_matches_single_process(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_dist_worker, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    for stats in ("population", "batch_mean"):
        single = _dist_model()
        convert_batchnorm(single, _dist_batches(), stats=stats)
        expected = single.state_dict()
        for res in results:
            assert res[stats]["num_batches"] == 4
            for k, v in expected.items():
                torch.testing.assert_close(res[stats]["state"][k], v, rtol=1e-10, atol=1e-12, msg=k)


# ---- errors: clear messages, model untouched ------------------------------------------------------------


def test_no_batchnorm_layer() -> None:
    with pytest.raises(BNConversionError, match="no BatchNorm layer"):
        convert_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)])
    assert issubclass(BNConversionError, ValueError)


def test_empty_batches_leave_model_unchanged() -> None:
    model = randomise_bn(conv_net())
    before = snapshot(model)
    with pytest.raises(BNConversionError, match="empty"):
        convert_batchnorm(model, iter([]))
    assert_state_equal(model, before)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_stats_name_the_layer_and_leave_model_unchanged(bad: float) -> None:
    model = randomise_bn(conv_net())
    model.train()
    model.bn2.eval()  # mixed modes must come back exactly
    before = snapshot(model)
    x = make_batches((4, 3, 8, 8), 2, seed=0)
    x[1][0, 0, 0, 0] = bad
    with pytest.raises(BNConversionError, match="'bn1'"):
        convert_batchnorm(model, x)
    assert_state_equal(model, before)
    assert model.training and model.bn1.training and not model.bn2.training


def test_unknown_options() -> None:
    model = conv_net()
    with pytest.raises(ValueError, match=r"batch_mean.*population"):
        convert_batchnorm(model, [torch.zeros(2, 3, 4, 4, dtype=torch.float64)], stats="running")
    with pytest.raises(ValueError, match=r"skip.*make_affine"):
        convert_batchnorm(model, [torch.zeros(2, 3, 4, 4, dtype=torch.float64)], affine_false="drop")


# ---- layers that cannot or need not be converted ---------------------------------------------------------


def test_affine_false_skip_by_default() -> None:
    model = randomise_bn(conv_net(affine=False))
    old_mean = model.bn1.running_mean.clone()
    probe = make_batches((4, 3, 8, 8), 1, seed=9)[0]
    ref = eval_out(model, probe)
    report = convert_batchnorm(model, make_batches((4, 3, 8, 8), 2, seed=0))
    assert torch.equal(model.bn1.running_mean, old_mean)
    assert model.bn1.weight is None and not model.bn1.affine
    layer = {r.name: r for r in report.layers}
    assert layer["bn1"].skipped == "affine=False" and layer["bn2"].skipped is None
    assert rel_err(eval_out(model, probe), ref) <= 1e-10


def test_affine_false_make_affine() -> None:
    model = randomise_bn(conv_net(affine=False))
    probe = make_batches((4, 3, 8, 8), 1, seed=9)[0]
    ref = eval_out(model, probe)
    batches = make_batches((4, 3, 8, 8), 2, seed=0)
    report = convert_batchnorm(model, batches, stats="population", affine_false="make_affine")
    assert model.bn1.affine and isinstance(model.bn1.weight, nn.Parameter)
    assert model.bn1.weight.requires_grad and "bn1.bias" in model.state_dict()
    with torch.no_grad():
        bn1_input = model.conv1(torch.cat(batches))
    torch.testing.assert_close(model.bn1.running_mean, _per_channel(bn1_input)[0])
    torch.testing.assert_close(model.bn1.running_var, _per_channel(bn1_input)[1])
    layer = {r.name: r for r in report.layers}
    assert layer["bn1"].skipped is None and layer["bn1"].made_affine
    assert rel_err(eval_out(model, probe), ref) <= 1e-10


def test_track_running_stats_false_skipped() -> None:
    model = randomise_bn(conv_net(track_running_stats=False))
    probe = make_batches((4, 3, 8, 8), 1, seed=9)[0]
    ref = eval_out(model, probe)
    before_bn1 = snapshot(model.bn1)
    report = convert_batchnorm(model, make_batches((4, 3, 8, 8), 2, seed=0))
    assert_state_equal(model.bn1, before_bn1)
    layer = {r.name: r for r in report.layers}
    assert layer["bn1"].skipped == "track_running_stats=False" and layer["bn1"].old_mean_mean is None
    assert rel_err(eval_out(model, probe), ref) <= 1e-10


class WithUnusedBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = conv_net()
        self.unused = nn.BatchNorm2d(5).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_layer_not_reached_is_skipped() -> None:
    model = WithUnusedBN()
    before = snapshot(model.unused)
    report = convert_batchnorm(model, make_batches((4, 3, 8, 8), 1, seed=0))
    assert_state_equal(model.unused, before)
    layer = {r.name: r for r in report.layers}
    assert layer["unused"].skipped == "not called during the forward pass"
    assert layer["net.bn1"].skipped is None
