"""Linear probe: agreement with scikit-learn, folding, sweep bookkeeping, validation, extraction."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from daft_core.probe import (
    LOGSPACE_CS,
    NORMALIZE_MODES,
    ProbeResult,
    ProbeSolver,
    extract_features,
    fit_linear_probe,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These problems are tiny: one BLAS/OpenMP thread avoids spin-wait stalls on a shared, busy CPU."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Real 64-dim features (8x8 digits), split train / val / held-out test by a fixed permutation."""
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm].astype(np.float32), y[perm].astype(np.int64)
    return {
        "xt": x[:1000],
        "yt": y[:1000],
        "xv": x[1000:1400],
        "yv": y[1000:1400],
        "xs": x[1400:],
        "ys": y[1400:],
    }


def _acc(head: nn.Linear, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def _shift_scale(x: np.ndarray, normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference normalisations, per column: the official DAFT code's scalar np.mean / np.std of the
    whole train matrix, sklearn's StandardScaler, or none."""
    x = x.astype(np.float64)
    d = x.shape[1]
    if normalize == "scalar":
        return np.full(d, x.mean()), np.full(d, x.std())
    if normalize == "per_feature":
        scaler = StandardScaler().fit(x)
        return scaler.mean_, scaler.scale_
    return np.zeros(d), np.ones(d)


def _sk_fit(
    d: dict[str, np.ndarray], c: float, normalize: str, tol: float = 1e-4
) -> tuple[tuple[np.ndarray, np.ndarray], LogisticRegression]:
    shift, scale = _shift_scale(d["xt"], normalize)
    clf = LogisticRegression(C=c, max_iter=5000, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit((d["xt"] - shift) / scale, d["yt"])
    return (shift, scale), clf


def _objective(w_raw: np.ndarray, b_raw: np.ndarray, scale: np.ndarray, c: float, d: dict) -> float:
    """sklearn's scaled objective on standardised features, evaluated through a raw-feature head."""
    logits = d["xt"].astype(np.float64) @ w_raw.T + b_raw
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    ce = float((lse - logits[np.arange(len(d["yt"])), d["yt"]]).mean())
    return ce + float(((w_raw * scale) ** 2).sum()) / (2 * c * len(d["yt"]))


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
@pytest.mark.parametrize("c", [1e-3, 0.05, 1.0])
def test_matches_sklearn_at_same_C(digits: dict[str, np.ndarray], c: float, normalize: str) -> None:
    """Same objective => same optimum value, same held-out accuracy (within 0.3 pt), same predictions."""
    (shift, scale), clf = _sk_fit(digits, c, normalize, tol=1e-6)
    sk_pred = clf.predict((digits["xs"] - shift) / scale)
    sk_acc = float((sk_pred == digits["ys"]).mean())
    res = fit_linear_probe(
        digits["xt"],
        digits["yt"],
        digits["xv"],
        digits["yv"],
        [c],
        device="cpu",
        max_iter=1000,
        tol=1e-6,
        normalize=normalize,
    )
    assert res.normalize == normalize
    acc = _acc(res.head, digits["xs"], digits["ys"])
    assert abs(acc - sk_acc) <= 0.003, (acc, sk_acc)
    with torch.no_grad():
        pred = res.head(torch.from_numpy(digits["xs"])).argmax(1).numpy()
    assert (pred == sk_pred).mean() >= 0.99
    # both reach the same minimum of the same objective (coefficients themselves are ill-determined at
    # large C on nearly separable data, so the objective is the fair comparison)
    sk_w = clf.coef_ / scale
    sk_b = clf.intercept_ - sk_w @ shift
    ours = _objective(
        res.head.weight.detach().double().numpy(),
        res.head.bias.detach().double().numpy(),
        scale,
        c,
        digits,
    )
    ref = _objective(sk_w, sk_b, scale, c, digits)
    assert ours == pytest.approx(ref, rel=2e-3), (ours, ref)


def test_sweep_picks_sensible_C(digits: dict[str, np.ndarray]) -> None:
    """Over the paper's grid, the chosen C is as good on val as the official recipe's best (scalar
    normalisation, ``LogisticRegression(max_iter=200, warm_start=True)`` refit per C)."""
    cs = LOGSPACE_CS[::2]  # 25 of the 50 values keeps the test quick; same spacing pattern
    res = fit_linear_probe(digits["xt"], digits["yt"], digits["xv"], digits["yv"], cs, device="cpu")
    assert len(res.sweep) == len(cs)
    assert [r["C"] for r in res.sweep] == pytest.approx(sorted(cs))
    assert res.normalize == "scalar" and res.solver["max_iter"] == 200 and res.solver["dtype"] == "float64"
    shift, scale = _shift_scale(digits["xt"], "scalar")
    xt, xv = (digits["xt"] - shift) / scale, (digits["xv"] - shift) / scale
    clf = LogisticRegression(max_iter=200, warm_start=True)
    sk_accs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cs:
            clf.set_params(C=float(c)).fit(xt, digits["yt"])
            sk_accs.append(float((clf.predict(xv) == digits["yv"]).mean()))
    assert res.val_accuracy >= max(sk_accs) - 0.003
    assert res.val_accuracy > 0.93
    assert 1e-4 < res.best_C < 1e2  # not the degenerate end of the grid
    # selection rule: most correct val samples (an integer count), ties -> the smallest C
    best = max(r["val_correct"] for r in res.sweep)
    assert res.best_C == min(r["C"] for r in res.sweep if r["val_correct"] == best)
    assert all(r["val_accuracy"] == r["val_correct"] / len(digits["yv"]) for r in res.sweep)
    # the head is the selected model: its accuracies match the sweep's record
    assert _acc(res.head, digits["xv"], digits["yv"]) == pytest.approx(res.val_accuracy, abs=1e-9)
    assert _acc(res.head, digits["xt"], digits["yt"]) == pytest.approx(res.train_accuracy, abs=1e-9)
    # warm starts make later Cs cheap: far fewer iterations than a cold start per C would need
    assert all(r["iterations"] <= 100 for r in res.sweep)


@pytest.mark.parametrize(
    ("normalize", "per_column_scale", "per_column_shift"),
    [("per_feature", True, True), ("scalar", False, False), ("none", False, True)],
)
def test_folded_head_applies_to_raw_features(
    digits: dict[str, np.ndarray], normalize: str, per_column_scale: bool, per_column_shift: bool
) -> None:
    """Transforms a mode normalises away give the same problem: the folded heads agree on raw features.

    per_feature absorbs any per-column affine map; scalar one global scale and shift; none a per-column
    shift (the unpenalised bias takes it).
    """
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.01, 100.0, size=64 if per_column_scale else 1).astype(np.float32)
    shift = rng.uniform(-50.0, 50.0, size=64 if per_column_shift else 1).astype(np.float32)
    if normalize == "none":
        scale = np.ones(1, np.float32)
    d2 = {k: (v * scale + shift if k.startswith("x") else v) for k, v in digits.items()}
    kw = {
        "device": "cpu",
        "normalize": normalize,
        # raw digits with large offsets are badly conditioned for "none": ~1000 iterations to tol 1e-7
        "solver": ProbeSolver(dtype=torch.float64, tol=1e-7, max_iter=3000),
    }
    a = fit_linear_probe(digits["xt"], digits["yt"], digits["xv"], digits["yv"], [0.1], **kw)
    b = fit_linear_probe(d2["xt"], d2["yt"], d2["xv"], d2["yv"], [0.1], **kw)

    def logits(head: nn.Linear, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).double() @ head.weight.detach().double().T + head.bias.detach().double()

    la, lb = logits(a.head, digits["xs"]), logits(b.head, d2["xs"])
    assert torch.equal(la.argmax(1), lb.argmax(1))
    torch.testing.assert_close(la, lb, atol=1e-3, rtol=1e-3)
    assert isinstance(b.head, nn.Linear) and b.head.weight.dtype == torch.float32
    assert b.head.weight.shape == (10, 64)


@pytest.mark.parametrize("normalize", NORMALIZE_MODES)
def test_constant_feature_is_harmless(digits: dict[str, np.ndarray], normalize: str) -> None:
    """Digits have all-zero pixels: the head stays finite; per_feature leaves them out (weight 0), the
    other modes keep them as the official code does (identical columns, so identical small weights)."""
    assert (digits["xt"].std(0) == 0).sum() >= 2
    res = fit_linear_probe(
        digits["xt"], digits["yt"], digits["xv"], digits["yv"], [1.0], device="cpu", normalize=normalize
    )
    assert torch.isfinite(res.head.weight).all() and torch.isfinite(res.head.bias).all()
    const = torch.from_numpy(digits["xt"].std(0) == 0)
    w_const = res.head.weight.detach()[:, const]
    if normalize == "per_feature":
        assert w_const.abs().max() == 0
    else:
        torch.testing.assert_close(w_const, w_const[:, :1].expand_as(w_const))
        assert w_const.abs().max() < res.head.weight.detach().abs().max()


def test_deterministic_and_json(digits: dict[str, np.ndarray]) -> None:
    cs = np.logspace(-4, 1, 6)
    a = fit_linear_probe(digits["xt"], digits["yt"], digits["xv"], digits["yv"], cs, device="cpu")
    b = fit_linear_probe(
        torch.from_numpy(digits["xt"]),
        torch.from_numpy(digits["yt"]),
        torch.from_numpy(digits["xv"]),
        torch.from_numpy(digits["yv"]),
        cs,
        device="cpu",
    )
    assert torch.equal(a.head.weight, b.head.weight) and torch.equal(a.head.bias, b.head.bias)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in a.sweep] == [strip(r) for r in b.sweep]
    d = json.loads(json.dumps(a.to_dict()))
    assert "head" not in d and d["best_C"] == a.best_C and len(d["sweep"]) == 6
    assert set(d["sweep"][0]) >= {"C", "train_accuracy", "val_accuracy", "val_loss", "iterations"}


def test_patience_stops_early_but_default_sweeps_all(digits: dict[str, np.ndarray]) -> None:
    cs = np.logspace(-2, 4, 12)  # val accuracy peaks early on digits, then plateaus/falls
    full = fit_linear_probe(digits["xt"], digits["yt"], digits["xv"], digits["yv"], cs, device="cpu")
    short = fit_linear_probe(
        digits["xt"], digits["yt"], digits["xv"], digits["yv"], cs, device="cpu", patience=2
    )
    assert len(full.sweep) == 12
    assert len(short.sweep) < 12
    assert [r["val_accuracy"] for r in short.sweep] == [r["val_accuracy"] for r in full.sweep][
        : len(short.sweep)
    ]


def test_preconditioner_only_changes_speed(digits: dict[str, np.ndarray]) -> None:
    """The Kronecker preconditioner is a solver detail: same val accuracies along the path, fewer passes."""
    cs = np.logspace(-4, 1, 8)
    args = (digits["xt"], digits["yt"], digits["xv"], digits["yv"], cs)
    # float64 and a tight tol: both converge, so they must reach the same optima
    kw = {"device": "cpu", "tol": 1e-6, "max_iter": 500}
    fast = fit_linear_probe(*args, solver=ProbeSolver(dtype=torch.float64), **kw)
    plain = fit_linear_probe(*args, solver=ProbeSolver(dtype=torch.float64, precondition=False), **kw)
    for a, b in zip(fast.sweep, plain.sweep, strict=True):
        assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 0.0026  # 1 of 400 val images
    assert sum(r["evaluations"] for r in fast.sweep) < sum(r["evaluations"] for r in plain.sweep)


def test_num_classes_larger_than_seen_labels() -> None:
    """A class absent from the train split still gets a row in the head (it never wins)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=g)
    x = torch.randn(200, 8, generator=g) + 3 * nn.functional.one_hot(y, 8).float()
    res = fit_linear_probe(x[:150], y[:150], x[150:], y[150:], [1.0], num_classes=5, device="cpu")
    assert res.head.out_features == 5 and res.num_classes == 5
    assert res.val_accuracy > 0.9


def test_solver_knobs_validated_and_keywords_override(digits: dict[str, np.ndarray]) -> None:
    """Bad knobs fail at construction; max_iter=/tol= keywords win over the solver's fields."""
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        ProbeSolver(max_iter=0)
    with pytest.raises(ValueError, match="tol > 0"):
        fit_linear_probe(digits["xt"], digits["yt"], digits["xv"], digits["yv"], [1.0], tol=0.0)
    with pytest.raises(ValueError, match="floating point"):
        ProbeSolver(dtype=torch.int64)
    res = fit_linear_probe(
        digits["xt"],
        digits["yt"],
        digits["xv"],
        digits["yv"],
        [1.0],
        device="cpu",
        solver=ProbeSolver(max_iter=500),
        max_iter=1,
    )
    assert res.sweep[0]["iterations"] == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"xt": np.zeros((10, 4, 1), np.float32)}, "2-D"),
        ({"yt": np.zeros(9, np.int64)}, "10 rows but train_y has 9"),
        ({"xv": np.zeros((5, 3), np.float32)}, "4 features but val_feats has 3"),
        ({"xt": np.full((10, 4), np.nan, np.float32)}, "non-finite"),
        ({"xv": np.full((5, 4), np.inf, np.float32)}, "non-finite"),
        ({"yt": np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 7])}, r"\[0, 5\)"),
        ({"yt": -np.ones(10, np.int64)}, "labels must lie"),
        ({"yt": np.zeros(10, np.int64), "yv": np.zeros(5, np.int64)}, "at least 2"),
        ({"yt": np.zeros(10, np.float32)}, "integer class indices"),
        ({"cs": [0.0, 1.0]}, "positive"),
        ({"cs": []}, "non-empty"),
        ({"xt": np.ones((10, 4), np.float32)}, "every feature is constant"),
    ],
)
def test_input_validation(kwargs: dict, match: str) -> None:
    rng = np.random.default_rng(0)
    args = {
        "xt": rng.normal(size=(10, 4)).astype(np.float32),
        "yt": np.arange(10) % 5,
        "xv": rng.normal(size=(5, 4)).astype(np.float32),
        "yv": np.arange(5),
        "cs": [1.0],
    }
    args.update(kwargs)
    nc = 5 if "labels must lie" in match or "0, 5" in match else None
    with pytest.raises(ValueError, match=match):
        fit_linear_probe(args["xt"], args["yt"], args["xv"], args["yv"], args["cs"], num_classes=nc)


# --------------------------------------------------------------------------------------------------
# extract_features
# --------------------------------------------------------------------------------------------------
class _TinyModel(nn.Module):
    """Stands in for DaftModel: uint8 images -> features(x) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.backbone(x.float() / 255.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _batches(n: int = 10, bs: int = 4, labels: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 3
    for i in range(0, n, bs):
        yield (x[i : i + bs], y[i : i + bs]) if labels else x[i : i + bs]


def test_extract_features_shapes_and_modes() -> None:
    model = _TinyModel().train()
    model.backbone[1].eval()  # a frozen BN inside a training model must stay frozen
    bn_mean = model.backbone[1].running_mean.clone()
    feats, labels = extract_features(model, _batches())
    assert feats.shape == (10, 4) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert (
        labels is not None and labels.dtype == torch.int64 and labels.tolist() == [i % 3 for i in range(10)]
    )
    assert model.training and model.drop.training and not model.backbone[1].training
    assert torch.equal(model.backbone[1].running_mean, bn_mean)  # no stats updated
    # eval mode: dropout off, so extraction is repeatable
    again, _ = extract_features(model, _batches())
    assert torch.equal(feats, again)
    assert not feats.requires_grad


def test_extract_features_unlabelled_and_errors() -> None:
    model = _TinyModel().eval()
    feats, labels = extract_features(model, _batches(labels=False), device="cpu", progress=True)
    assert feats.shape == (10, 4) and labels is None
    assert not model.training
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [])
    mixed = [next(_batches()), next(_batches(labels=False))]
    with pytest.raises(ValueError, match="carried labels"):
        extract_features(model, mixed)
    with pytest.raises(TypeError, match="features"):
        extract_features(nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_probe_on_extracted_features_end_to_end() -> None:
    """extract_features -> fit_linear_probe -> head plugs back into the model."""
    model = _TinyModel()
    feats, labels = extract_features(model, _batches(n=60, bs=16))
    assert labels is not None
    res = fit_linear_probe(feats[:40], labels[:40], feats[40:], labels[40:], [0.1, 1.0], device="cpu")
    assert isinstance(res, ProbeResult)
    model.head = res.head
    with torch.no_grad():
        out = model.eval()(next(_batches(n=4, bs=4))[0])
    assert out.shape == (4, 3)
