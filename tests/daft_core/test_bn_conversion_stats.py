"""The statistics pass of the BN conversion: exact in every memory layout, precise in float32/half
dtypes, and free of activation-sized copies (no float64 copy, no transpose)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from daft_core.bn_conversion import (
    _Accumulator,
    _accumulator_device,
    _batch_moments,
    batchnorm_layers,
    convert_batchnorm,
)

torch.set_num_threads(1)


def _cl_1d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, L) stored as (N, L, C): the 1-D analogue of channels-last."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


# name: (BN type, per-sample shape, layout applied to each batch); the layout is what the hooks see.
CASES: dict[str, tuple[type[nn.Module], tuple[int, ...], Callable[[torch.Tensor], torch.Tensor]]] = {
    "bn2d_contiguous": (nn.BatchNorm2d, (4, 6, 5), lambda x: x.contiguous()),
    "bn2d_channels_last": (
        nn.BatchNorm2d,
        (4, 6, 5),
        lambda x: x.contiguous(memory_format=torch.channels_last),
    ),
    "bn2d_strided": (nn.BatchNorm2d, (4, 6, 10), lambda x: x[..., ::2]),  # neither layout: fallback
    "bn1d_2d": (nn.BatchNorm1d, (4,), lambda x: x),
    "bn1d_3d": (nn.BatchNorm1d, (4, 7), lambda x: x.contiguous()),
    "bn1d_3d_channels_last": (nn.BatchNorm1d, (4, 7), _cl_1d),
    "bn3d_channels_last": (
        nn.BatchNorm3d,
        (4, 3, 4, 5),
        lambda x: x.contiguous(memory_format=torch.channels_last_3d),
    ),
}
SIZES = (5, 8, 3)  # a ragged last batch: batch_mean weights by batch size


def _batches(case: str, dtype: torch.dtype, loc: float = 1.0, scale: float = 2.0) -> list[torch.Tensor]:
    _, shape, layout = CASES[case]
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(SIZES):
        x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * scale * (1 + 0.3 * i) + loc + i
        out.append(layout(x.to(dtype)))
    return out


def _per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference: (mean, biased var) per channel of the values as given."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def _reference(batches: list[torch.Tensor], stats: str) -> tuple[torch.Tensor, torch.Tensor]:
    if stats == "population":
        return _per_channel(torch.cat([b.double().contiguous() for b in batches]))
    per = [_per_channel(b) for b in batches]
    w = torch.tensor([len(b) for b in batches], dtype=torch.float64)[:, None] / sum(len(b) for b in batches)
    return (torch.stack([p[0] for p in per]) * w).sum(0), (torch.stack([p[1] for p in per]) * w).sum(0)


def _converted(case: str, batches: list[torch.Tensor], stats: str, dtype: torch.dtype) -> nn.Module:
    bn_type = CASES[case][0]
    model = nn.Sequential(bn_type(batches[0].shape[1])).to(dtype)
    convert_batchnorm(model, batches, stats=stats)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b).abs() / b.abs()).max())


@pytest.mark.parametrize("stats", ["batch_mean", "population"])
@pytest.mark.parametrize("case", list(CASES))
def test_float64_statistics_exact_in_every_layout(case: str, stats: str) -> None:
    batches = _batches(case, torch.float64)
    model = _converted(case, batches, stats, torch.float64)
    mean, var = _reference(batches, stats)
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stats", ["batch_mean", "population"])
@pytest.mark.parametrize(
    "case", ["bn2d_contiguous", "bn2d_channels_last", "bn1d_3d", "bn1d_3d_channels_last"]
)
def test_float32_statistics_within_1e5_of_float64(case: str, stats: str) -> None:
    # Mean 40x the spread: E[x^2] - E[x]^2 in float32 would lose every digit; the conversion must not.
    batches = _batches(case, torch.float32, loc=40.0, scale=1.0)
    model = _converted(case, batches, stats, torch.float32)
    mean, var = _reference(batches, stats)
    assert _rel(model[0].running_mean, mean) <= 1e-5
    assert _rel(model[0].running_var, var) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["bn2d_contiguous", "bn2d_channels_last", "bn1d_2d"])
def test_half_inputs_reduced_in_float32(case: str, dtype: torch.dtype) -> None:
    x = _batches(case, dtype, loc=3.0)[1]
    var, mean = _batch_moments(x)
    assert {var.dtype, mean.dtype} <= {torch.float32, torch.float64}  # never the half dtype
    ref_mean, ref_var = _per_channel(x)  # exact statistics of the half values
    assert _rel(mean, ref_mean) <= 1e-5 and _rel(var, ref_var) <= 1e-5


def test_half_model_conversion_preserves_eval_function() -> None:
    batches = _batches("bn2d_channels_last", torch.bfloat16, loc=3.0)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Flatten()).to(torch.bfloat16).eval()
    probe = batches[0]
    with torch.no_grad():
        before = model(probe).float()
    convert_batchnorm(model, batches, stats="population")
    with torch.no_grad():
        after = model(probe).float()
    assert model[1].running_mean.dtype == torch.bfloat16
    assert float((after - before).abs().max()) <= 0.05 * float(before.abs().max())  # bf16 resolution
    assert float(model[1].running_var.float().mean()) > 1.5  # really the new (wider) statistics


class _Allocations(TorchDispatchMode):
    """Largest *new* tensor (views of an op's inputs excluded) any op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.largest_float64 = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = tree_flatten((args, kwargs))[0]
        shared = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in shared:
                self.largest = max(self.largest, t.numel())
                if t.dtype == torch.float64:
                    self.largest_float64 = max(self.largest_float64, t.numel())
        return out


@pytest.mark.parametrize("stats", ["batch_mean", "population"])
@pytest.mark.parametrize("case", ["bn2d_contiguous", "bn2d_channels_last", "bn1d_3d", "bn3d_channels_last"])
def test_no_activation_sized_copy(case: str, stats: str) -> None:
    x = _batches(case, torch.float32)[1]  # 8 samples, in the case's layout
    acc = _Accumulator(stats, torch.device("cpu"))
    with _Allocations() as seen:
        acc.update(x)
    per_sample = x.numel() // x.shape[0]  # column statistics of the (N, C*S) view: 1/N of the input
    assert seen.largest <= per_sample < x.numel()
    assert seen.largest_float64 <= per_sample


def test_channels_last_resnet_function_preserved() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).double().eval()
    with torch.no_grad():  # non-trivial running statistics, as a pretrained model has
        for _, m in batchnorm_layers(model):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64) * 2 + 1).contiguous(
            memory_format=torch.channels_last
        )
        for _ in range(2)
    ]
    probe = batches[0]
    with torch.no_grad():
        ref = model(probe)
    convert_batchnorm(model, batches)
    with torch.no_grad():
        out = model(probe)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # layout untouched


def test_float64_sums_never_on_mps() -> None:
    assert _accumulator_device(torch.device("mps")) == torch.device("cpu")
    assert _accumulator_device(torch.device("cpu")) == torch.device("cpu")
