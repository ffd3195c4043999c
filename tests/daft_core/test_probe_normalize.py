"""Linear probe: the normalisation modes, their exact fold-back, and run-to-run reproducible selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from daft_core.probe import LOGSPACE_CS, NORMALIZE_MODES, ProbeSolver, fit_linear_probe
from daft_core.probe.fit import fold_head
from daft_core.probe.prepare import normalise

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny problems: one BLAS/OpenMP thread avoids spin-wait stalls on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _features(seed: int = 0, n: int = 400, dim: int = 48) -> tuple[torch.Tensor, ...]:
    """Backbone-like features: class signal, large offsets, and a near-constant column of pure noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, dim, generator=g) + 1.5 * torch.nn.functional.one_hot(y, dim).float()
    x = (x.relu() * torch.linspace(0.5, 4.0, dim) + 3.0).float()
    x[:, -1] = 2.0 + 1e-4 * torch.randn(n, generator=g)  # near-constant: std 1e-4, no signal
    x[:, -2] = 1.0  # exactly constant
    cut = n * 3 // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_fold_is_exact(normalize: str) -> None:
    """The folded head on raw features gives the solver's logits on normalised features (<= 1e-5)."""
    xt, yt, xv, yv = _features()
    prob = normalise(xt, yt, xv, yv, torch.device("cpu"), torch.float64, normalize)
    theta = torch.randn(4, int(prob.live.sum()) + 1, generator=torch.Generator().manual_seed(1))
    theta = theta.double()
    w, b = fold_head(theta, prob)
    raw = xv.double() @ w.T + b
    solver_logits = prob.x_val @ theta.T
    assert (raw - solver_logits).abs().max() <= 1e-5
    # the scalar mode is the official formula: W = coef / std, b = intercept - coef @ (mean / std * 1)
    if normalize == "scalar":
        m, s = xt.double().mean(), xt.double().std(unbiased=False)
        coef, intercept = theta[:, :-1], theta[:, -1]
        torch.testing.assert_close(w, coef / s, rtol=1e-12, atol=0)
        torch.testing.assert_close(
            b, intercept - coef @ (m / s * torch.ones(xt.shape[1], dtype=torch.float64))
        )
        assert bool(prob.live.all())
    # and the float32 head that fit_linear_probe returns is that fold, rounded once
    res = fit_linear_probe(xt, yt, xv, yv, [0.1], device="cpu", normalize=normalize)
    with torch.no_grad():
        head_logits = res.head(xv).double()
    assert res.val_accuracy == float((head_logits.argmax(1) == yv).double().mean())
    assert prob.normalize == normalize == res.normalize


def test_scalar_mode_keeps_near_constant_features_quiet() -> None:
    """The issue: per_feature blows a std-1e-4 noise column up to unit variance and folds its weight back
    by 1/1e-4; the paper's scalar mode leaves it a tiny input and a tiny weight."""
    xt, yt, xv, yv = _features()
    weights = {}
    for mode in ("scalar", "per_feature"):
        res = fit_linear_probe(xt, yt, xv, yv, [1.0], device="cpu", normalize=mode)
        weights[mode] = float(res.head.weight.detach()[:, -1].abs().max())
    assert weights["per_feature"] > 100.0, weights
    assert weights["scalar"] < 1e-2, weights


def test_normalize_recorded_and_validated() -> None:
    xt, yt, xv, yv = _features()
    res = fit_linear_probe(xt, yt, xv, yv, [1.0], device="cpu")
    d = json.loads(json.dumps(res.to_dict()))
    assert d["normalize"] == "scalar"
    assert d["solver"] == {
        "max_iter": 200,
        "tol": 1e-4,
        "history": 30,
        "precondition": True,
        "dtype": "float64",
    }
    assert isinstance(d["sweep"][0]["val_correct"], int)
    assert ProbeSolver().max_iter == 200
    with pytest.raises(ValueError, match="normalize must be one of 'scalar', 'per_feature', 'none'"):
        fit_linear_probe(xt, yt, xv, yv, [1.0], normalize="standard")  # type: ignore[arg-type]
    const = torch.ones_like(xt) * torch.arange(xt.shape[1])  # every column constant, columns differ
    for mode in NORMALIZE_MODES:
        with pytest.raises(ValueError, match="every feature is constant"):
            fit_linear_probe(const, yt, xv, yv, [1.0], normalize=mode)


_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from daft_core.probe import LOGSPACE_CS, fit_linear_probe
    torch.set_num_threads(int(sys.argv[1]))
    rng = np.random.default_rng(0)
    k, rank, dim = 10, 32, 512
    centers = rng.normal(size=(k, rank)) * 0.3
    proj = rng.normal(size=(rank, dim)) / np.sqrt(1.0 + np.arange(rank))[:, None] / np.sqrt(rank)
    def draw(m):
        y = rng.integers(0, k, size=m)
        x = (centers[y] + rng.normal(size=(m, rank))) @ proj + 0.15 * rng.normal(size=(m, dim)) + 0.1
        return torch.from_numpy(np.maximum(x, 0).astype(np.float32)), torch.from_numpy(y)
    xt, yt = draw(1000)
    xv, yv = draw(300)
    out = {}
    for mode in ("scalar", "per_feature"):
        r = fit_linear_probe(xt, yt, xv, yv, LOGSPACE_CS[::2], device="cpu", normalize=mode)
        head = torch.cat([r.head.weight.detach(), r.head.bias.detach()[:, None]], 1).double().tolist()
        out[mode] = {"C": r.best_C, "correct": [s["val_correct"] for s in r.sweep], "head": head}
    print(json.dumps(out))
    """
)


def test_selection_reproducible_across_processes_and_threads(tmp_path: Path) -> None:
    """Two processes (1 and 2 BLAS threads) choose the same C and the same head (<= 1e-6), both modes.

    In float32 the thread count changes BLAS reduction order at this size, the warm-started path drifts
    and val counts along the sweep differ (heads 8 apart when measured); the float64 default makes the
    whole sweep reproducible.
    """
    script = tmp_path / "probe_once.py"
    script.write_text(_SCRIPT)
    runs = []
    for threads in (1, 2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "OMP_WAIT_POLICY": "PASSIVE",  # no spin-waiting on a busy shared CPU; results do not change
        }
        out = subprocess.run(
            [sys.executable, str(script), str(threads)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for mode in ("scalar", "per_feature"):
        a, b = runs[0][mode], runs[1][mode]
        assert a["C"] == b["C"], mode
        assert a["correct"] == b["correct"], mode
        assert np.abs(np.asarray(a["head"]) - np.asarray(b["head"])).max() <= 1e-6, mode
        assert len(a["correct"]) == len(LOGSPACE_CS[::2])
