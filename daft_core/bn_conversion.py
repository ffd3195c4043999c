"""Function-preserving BatchNorm conversion (DAFT, Ha/Jeong/Lee AAAI 2024).

Fine-tuning in train mode normalises with *target* batch statistics, while the pretrained network was
calibrated to its *source* running statistics; the first steps therefore see a different function and
distort the features. DAFT first measures the target statistics and folds the change into each layer's
affine parameters, so the eval-mode function is unchanged and train-mode batches start close to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from daft_core.devices import module_device
from daft_core.errors import BNConversionError

__all__ = [
    "AFFINE_FALSE_CHOICES",
    "STATS_CHOICES",
    "BNConversionError",
    "BNConversionReport",
    "LayerReport",
    "batchnorm_layers",
    "convert_batchnorm",
]

STATS_CHOICES = ("batch_mean", "population")
AFFINE_FALSE_CHOICES = ("skip", "make_affine")

SKIP_NOT_TRACKING = "track_running_stats=False"
SKIP_NOT_AFFINE = "affine=False"
SKIP_NOT_CALLED = "not called during the forward pass"


@dataclass
class LayerReport:
    name: str
    type: str
    num_features: int
    old_mean_mean: float | None = None
    old_var_mean: float | None = None
    new_mean_mean: float | None = None  # measured even when the layer is skipped for affine=False
    new_var_mean: float | None = None
    scale_min: float | None = None  # weight multiplier sqrt(var_new + eps) / sqrt(var_old + eps)
    scale_mean: float | None = None
    scale_max: float | None = None
    skipped: str | None = None
    made_affine: bool = False


@dataclass
class BNConversionReport:
    stats: str
    num_batches: int  # summed over ranks when torch.distributed is initialised
    num_samples: int
    layers: list[LayerReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm-like layer (any ``_BatchNorm`` subclass, SyncBatchNorm included), in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


_HALF = (torch.float16, torch.bfloat16)


def _column_view(x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """``x`` (N, C, *S) as an (N, C*S) or (N, S*C) matrix *view* (no copy): (matrix, channels_last).

    Works for contiguous and channels-last layouts; None for any other stride pattern.
    """
    n = x.shape[0]
    if x.is_contiguous():
        return x.view(n, -1), False
    order = (0, *range(2, x.dim()), 1)
    xp = x.permute(order)
    if xp.is_contiguous():
        return xp.reshape(n, -1), True  # a view: xp is contiguous
    return None


def _bn_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased variance) per dim-1 channel from BN's own vectorised CPU statistics kernel.

    A two-pass reduction in the input's dtype that reads ``x`` in place, unlike ``torch.var_mean``,
    which on CPU is a scalar Welford loop (~20x slower, slower than a float64 copy).
    """
    return torch.batch_norm_update_stats(x, None, None, 1.0)


def _batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel biased variance and mean of one BN input (N, C, *S), as (C,) tensors.

    No float64 copy of the activation: it is reduced in its own dtype (float32 for half dtypes) and
    memory layout. On CPU each column of the (N, C*S) / (N, S*C) matrix view gets its mean and variance
    over only N values (precise even with naive float32 sums), then the S columns of each channel are
    pooled exactly in float64: mean of means, mean of variances + variance of means. Elsewhere
    ``torch.var_mean`` (fast on CUDA) reduces over (0, 2, ...) directly.
    """
    x = x.detach()
    if x.dtype in _HALF:
        x = x.float()
    c = x.shape[1]
    cols = _column_view(x) if x.device.type == "cpu" else None
    if cols is None:
        var, mean = torch.var_mean(x, dim=(0, *range(2, x.dim())), correction=0)
        return var, mean
    flat, channels_last = cols
    mean, var = _bn_moments(flat)
    spatial = mean.numel() // c
    if spatial == 1:
        return var, mean
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    if channels_last:  # columns ordered (s, c): rows of an (S, C) matrix
        mu, spread = _bn_moments(mean.view(spatial, c))
        within = var.view(spatial, c).mean(0)
    else:  # (c, s): one (1, C, S) "batch" with S values per channel
        mu, spread = _bn_moments(mean.view(1, c, spatial))
        within = var.view(c, spatial).mean(1)
    return within.add_(spread), mu


class _Accumulator:
    """Per-channel statistics of one layer, accumulated in float64 so that long passes keep precision.

    Only what ``stats`` needs: batch-size-weighted sums of batch means/variances ("batch_mean"), or the
    Chan et al. running (count, mean, M2) merge of per-batch (n, mean, n * var) ("population").
    """

    def __init__(self, stats: str, device: torch.device) -> None:
        self.stats = stats
        self.device = device  # float64 lives here (never on mps)
        self.w = 0.0  # samples seen (batch_mean weights)
        self.n = 0.0  # elements per channel seen (population)
        self.a: torch.Tensor | None = None  # sum of w_b * mean_b, or running mean
        self.b: torch.Tensor | None = None  # sum of w_b * var_b, or running M2

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        var_b, mean_b = _batch_moments(x)
        if var_b.device != self.device:
            var_b, mean_b = var_b.to(self.device), mean_b.to(self.device)
        if self.a is None:
            z = torch.zeros(mean_b.shape, dtype=torch.float64, device=self.device)
            self.a, self.b = z, z.clone()
        # In-place adds promote the (float32) batch moments into the float64 sums without extra copies.
        if self.stats == "batch_mean":
            w_b = float(x.shape[0])
            self.a.add_(mean_b, alpha=w_b)
            self.b.add_(var_b, alpha=w_b)
            self.w += w_b
            return
        n_b = float(x.numel() // x.shape[1])
        n = self.n + n_b
        delta = mean_b - self.a  # float64
        self.a.add_(delta, alpha=n_b / n)
        self.b.add_(var_b, alpha=n_b).add_(delta.square_(), alpha=self.n * n_b / n)
        self.n = n

    def state(self, num_features: int) -> list[torch.Tensor]:
        """[count, a, b] for the all-reduce; zeros for a layer this rank never reached (same shapes)."""
        if self.a is None:
            z = torch.zeros(num_features, dtype=torch.float64, device=self.device)
            return [z.new_zeros(()), z, z.clone()]
        count = self.w if self.stats == "batch_mean" else self.n
        return [torch.tensor(count, dtype=torch.float64, device=self.device), self.a, self.b]


def _accumulator_device(device: torch.device) -> torch.device:
    """Where the float64 sums live: the model's device, except mps (no float64 there)."""
    return torch.device("cpu") if device.type == "mps" else device


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_across_ranks(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One all-reduce for all layers, so every rank ends with identical statistics."""
    if not _distributed():
        return tensors
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    parts = flat.split([t.numel() for t in tensors])
    return [p.reshape(t.shape).to(t.device) for p, t in zip(parts, tensors, strict=True)]


def _first_element(batch: Any) -> Any:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _summary(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().cpu().double().mean())


def convert_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    stats: str = "batch_mean",
    *,
    affine_false: str = "skip",
) -> BNConversionReport:
    """Replace every BN layer's running statistics by those of ``batches`` without changing eval outputs.

    ``stats="batch_mean"`` (the paper) averages per-batch means and biased variances weighted by batch
    size, i.e. what train-mode BN will actually see; ``"population"`` uses exact pooled statistics.
    Layers with ``affine=False`` cannot absorb the change: by default they are left as they are
    (``affine_false="skip"``); ``"make_affine"`` gives them weight/bias parameters that preserve the
    function (their state_dict then gains ``weight``/``bias``). ``track_running_stats=False`` layers
    already use batch statistics and are skipped. Under an initialised ``torch.distributed`` the sums
    are all-reduced, so each rank may pass its own shard and all get the same result.
    Nothing is modified if a ``BNConversionError`` is raised. The original train/eval flags are restored.
    """
    if stats not in STATS_CHOICES:
        raise ValueError(f"unknown stats={stats!r}; expected one of {STATS_CHOICES}")
    if affine_false not in AFFINE_FALSE_CHOICES:
        raise ValueError(f"unknown affine_false={affine_false!r}; expected one of {AFFINE_FALSE_CHOICES}")
    layers = batchnorm_layers(model)
    if not layers:
        raise BNConversionError(
            f"{type(model).__name__} has no BatchNorm layer (no torch.nn.modules.batchnorm._BatchNorm "
            "subclass); there is nothing to convert"
        )

    device = module_device(model)
    acc_device = _accumulator_device(device)
    tracked = [(name, m) for name, m in layers if m.track_running_stats and m.running_mean is not None]
    accs = {name: _Accumulator(stats, acc_device) for name, _ in tracked}

    def make_hook(acc: _Accumulator) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            acc.update(inputs[0])

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(make_hook(accs[name])) for name, m in tracked]
    num_batches = num_samples = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                x = _first_element(batch)
                x = x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x
                model(x)
                num_batches += 1
                num_samples += len(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    new_stats, num_batches, num_samples = _finalise(
        tracked, accs, stats, acc_device, num_batches, num_samples
    )
    if num_batches == 0:
        raise BNConversionError("`batches` is empty: at least one batch is needed to measure statistics")

    # Plan everything first so that an invalid layer leaves the whole model untouched.
    reports, plan = [], []
    for name, m in layers:
        rep = LayerReport(name=name, type=type(m).__name__, num_features=m.num_features)
        reports.append(rep)
        if name not in new_stats:
            rep.skipped = SKIP_NOT_TRACKING
            continue
        rep.old_mean_mean, rep.old_var_mean = _summary(m.running_mean), _summary(m.running_var)
        if new_stats[name] is None:
            rep.skipped = SKIP_NOT_CALLED
            continue
        mu_new, var_new = new_stats[name]
        rep.new_mean_mean, rep.new_var_mean = _summary(mu_new), _summary(var_new)
        if not m.affine and affine_false == "skip":
            rep.skipped = SKIP_NOT_AFFINE
            _check_finite(name, mu_new=mu_new, var_new=var_new)
            continue
        mu_old, var_old = (t.detach().to(acc_device, torch.float64) for t in (m.running_mean, m.running_var))
        std_old, std_new = (var_old + m.eps).sqrt(), (var_new + m.eps).sqrt()
        scale = std_new / std_old
        if m.affine:
            w_old, b_old = (t.detach().to(acc_device, torch.float64) for t in (m.weight, m.bias))
        else:
            w_old, b_old = torch.ones_like(mu_old), torch.zeros_like(mu_old)
            rep.made_affine = True
        bias = b_old + (mu_new - mu_old) * w_old / std_old
        weight = w_old * scale
        _check_finite(name, mu_new=mu_new, var_new=var_new, weight=weight, bias=bias)
        rep.scale_min, rep.scale_mean, rep.scale_max = (
            float(scale.min()),
            float(scale.mean()),
            float(scale.max()),
        )
        plan.append((m, mu_new, var_new, weight, bias))

    with torch.no_grad():
        for m, mu_new, var_new, weight, bias in plan:
            if not m.affine:
                m.weight = nn.Parameter(weight.to(m.running_mean))
                m.bias = nn.Parameter(bias.to(m.running_mean))
                m.affine = True
            else:
                m.weight.copy_(weight.to(m.weight))
                m.bias.copy_(bias.to(m.bias))
            m.running_mean.copy_(mu_new.to(m.running_mean))
            m.running_var.copy_(var_new.to(m.running_var))

    return BNConversionReport(stats=stats, num_batches=num_batches, num_samples=num_samples, layers=reports)


def _finalise(
    tracked: list[tuple[str, _BatchNorm]],
    accs: dict[str, _Accumulator],
    stats: str,
    device: torch.device,
    num_batches: int,
    num_samples: int,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor] | None], int, int]:
    """Combine (and all-reduce) the sums: {name: (mean, var), or None if never reached}, batches, samples."""
    states = [accs[name].state(m.num_features) for name, m in tracked]
    counts = torch.tensor([num_batches, num_samples], dtype=torch.float64, device=device)
    if stats == "batch_mean":
        sums = _sum_across_ranks([counts] + [t for st in states for t in st], device)
        out = {
            name: (wm / w, wv / w) if w > 0 else None
            for (name, _), w, wm, wv in zip(tracked, sums[1::3], sums[2::3], sums[3::3], strict=True)
        }
    else:
        sums = _sum_across_ranks([counts] + [t for n, mean, _ in states for t in (n, n * mean)], device)
        ns, means = sums[1::2], [s / n if n > 0 else s for n, s in zip(sums[1::2], sums[2::2], strict=True)]
        # Second pass: deviations around the global mean keep the pooled variance numerically stable.
        m2s = _sum_across_ranks(
            [m2 + n * (mean - mu).square() for (n, mean, m2), mu in zip(states, means, strict=True)], device
        )
        out = {
            name: (mu, m2 / n) if n > 0 else None
            for (name, _), n, mu, m2 in zip(tracked, ns, means, m2s, strict=True)
        }
    return out, round(float(sums[0][0])), round(float(sums[0][1]))


def _check_finite(layer: str, **tensors: torch.Tensor) -> None:
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise BNConversionError(
            f"non-finite {', '.join(bad)} in BatchNorm layer {layer!r}; check the inputs for inf/nan "
            "(nothing was modified)"
        )
