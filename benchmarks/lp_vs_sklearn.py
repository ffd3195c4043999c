"""Time the torch linear-probe C sweep against scikit-learn's warm-started lbfgs sweep.

``python -m benchmarks.lp_vs_sklearn [--n 5000 --dim 1280 --classes 10 --num-cs 50 ...]`` prints ONE JSON
line: both sweeps' wall time, chosen C, ID-val accuracy, and the speedup. Features are synthetic but shaped
like a backbone's penultimate layer: class-conditional gaussians in a low-rank latent space, mapped through
a random projection with a decaying spectrum, plus noise, then a ReLU (post-activation features are
non-negative, sparse and strongly correlated, which is what makes real probes ill-conditioned).

sklearn runs on the same normalised features (``--normalize``: the paper's scalar mean/std by default,
or per_feature = StandardScaler, or none), one ``fit`` per C with ``warm_start=True`` (the LP-FT /
DAFT reference recipe) and its own defaults otherwise (``tol=1e-4``, ``max_iter`` = ``--max-iter``, sklearn's
default 100), so both solvers minimise the same objective under the same stopping rule.
``--max-seconds`` stops sklearn's sweep early; the speedup is then computed on the Cs both completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
import warnings

import numpy as np
import torch

from daft_core.probe import LOGSPACE_CS, NORMALIZE_MODES, fit_linear_probe


def make_features(
    n: int, n_val: int, dim: int, classes: int, rank: int, seed: int, sep: float = 0.3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backbone-like features: low-rank class structure + noise, ReLU'd, float32."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, rank)) * sep
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(rank))  # a few strong directions, a long weak tail
    proj = rng.normal(size=(rank, dim)) * spectrum[:, None] / np.sqrt(rank)

    def draw(m: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=m)
        z = centers[y] + rng.normal(size=(m, rank))
        x = z @ proj + 0.15 * rng.normal(size=(m, dim)) + 0.1
        return np.maximum(x, 0.0).astype(np.float32), y.astype(np.int64)

    xt, yt = draw(n)
    xv, yv = draw(n_val)
    return xt, yt, xv, yv


def sklearn_sweep(
    xt: np.ndarray,
    yt: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
    cs: np.ndarray,
    max_iter: int,
    tol: float,
    max_seconds: float,
    normalize: str = "scalar",
) -> dict:
    """The reference recipe: normalise as the probe does, then LogisticRegression(warm_start=True) per C."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0, c0 = time.perf_counter(), time.process_time()
    if normalize == "scalar":  # the official DAFT code: one np.mean / np.std over the train matrix
        mean, std = float(np.mean(xt, dtype=np.float64)), float(np.std(xt, dtype=np.float64))
        xts, xvs = (xt - mean) / std, (xv - mean) / std
    elif normalize == "per_feature":
        scaler = StandardScaler().fit(xt)
        xts, xvs = scaler.transform(xt), scaler.transform(xv)
    else:
        xts, xvs = xt, xv
    clf = LogisticRegression(warm_start=True, max_iter=max_iter, tol=tol, random_state=0)
    accs: list[float] = []
    cum: list[float] = []
    not_converged = iterations = 0
    for c in cs:
        clf.set_params(C=float(c))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(xts, yt)
        not_converged += any(issubclass(x.category, ConvergenceWarning) for x in w)
        iterations += int(np.max(clf.n_iter_))
        accs.append(float((clf.predict(xvs) == yv).mean()))
        cum.append(time.perf_counter() - t0)
        if cum[-1] > max_seconds:
            break
    best = int(np.argmax(accs))  # first max = smallest C, same tie rule as the torch probe
    return {
        "seconds": cum[-1],
        "cpu_seconds": time.process_time() - c0,
        "iterations": iterations,
        "cum_seconds": cum,
        "completed_cs": len(accs),
        "best_C": float(cs[best]),
        "val_accuracy": accs[best],
        "not_converged_cs": int(not_converged),
        "val_accuracies": accs,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="train rows")
    p.add_argument("--n-val", type=int, default=None, help="val rows (default n // 5)")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--rank", type=int, default=64, help="latent rank of the class structure")
    p.add_argument("--num-cs", type=int, default=50, help="grid size over logspace(-7, 2)")
    p.add_argument("--max-iter", type=int, default=100, help="per-C iteration cap, both solvers")
    p.add_argument("--tol", type=float, default=1e-4, help="gradient tolerance, both solvers")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="stop sklearn's sweep after this")
    p.add_argument("--sep", type=float, default=0.3, help="class separation (0.3: ~73%% val accuracy)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads for both solvers")
    p.add_argument("--normalize", choices=NORMALIZE_MODES, default="scalar", help="both solvers")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    n_val = a.n_val if a.n_val is not None else max(a.n // 5, 1)
    cs = LOGSPACE_CS if a.num_cs == 50 else np.logspace(-7, 2, a.num_cs)
    xt, yt, xv, yv = make_features(a.n, n_val, a.dim, a.classes, a.rank, a.seed, a.sep)
    limits = contextlib.nullcontext()
    if a.threads is not None:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        torch.set_num_threads(a.threads)
        limits = threadpool_limits(limits=a.threads)

    with limits:
        return _run(a, cs, n_val, xt, yt, xv, yv)


def _run(
    a: argparse.Namespace,
    cs: np.ndarray,
    n_val: int,
    xt: np.ndarray,
    yt: np.ndarray,
    xv: np.ndarray,
    yv: np.ndarray,
) -> dict:
    """Torch sweep, then sklearn's, on the same features; one JSON line."""
    c0 = time.process_time()
    res = fit_linear_probe(
        torch.from_numpy(xt),
        torch.from_numpy(yt),
        torch.from_numpy(xv),
        torch.from_numpy(yv),
        cs,
        device=a.device,
        max_iter=a.max_iter,
        tol=a.tol,
        normalize=a.normalize,
    )
    torch_cpu = time.process_time() - c0
    out: dict = {
        "n": a.n,
        "n_val": n_val,
        "dim": a.dim,
        "classes": a.classes,
        "num_cs": len(cs),
        "max_iter": a.max_iter,
        "tol": a.tol,
        "normalize": a.normalize,
        "threads": a.threads,
        "device": str(a.device or ("cuda" if torch.cuda.is_available() else "cpu")),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch_seconds": round(res.seconds, 3),
        "torch_cpu_seconds": round(torch_cpu, 3),
        "torch_best_C": res.best_C,
        "torch_val_accuracy": res.val_accuracy,
        "torch_total_iterations": int(sum(r["iterations"] for r in res.sweep)),
        "torch_total_evaluations": int(sum(r["evaluations"] for r in res.sweep)),
    }
    if not a.skip_sklearn:
        sk = sklearn_sweep(xt, yt, xv, yv, cs, a.max_iter, a.tol, a.max_seconds, a.normalize)
        m = sk["completed_cs"]
        setup = res.seconds - sum(r["seconds"] for r in res.sweep)  # standardise, preconditioner
        torch_prefix = setup + sum(r["seconds"] for r in res.sweep[:m])
        torch_best_prefix = max(r["val_accuracy"] for r in res.sweep[:m])
        out.update(
            {
                "sklearn_seconds": round(sk["seconds"], 3),
                "sklearn_cpu_seconds": round(sk["cpu_seconds"], 3),
                "sklearn_total_iterations": sk["iterations"],
                "sklearn_completed_cs": m,
                "sklearn_best_C": sk["best_C"],
                "sklearn_val_accuracy": sk["val_accuracy"],
                "sklearn_not_converged_cs": sk["not_converged_cs"],
                "speedup": round(sk["seconds"] / res.seconds, 2) if m == len(cs) else None,
                "cpu_time_speedup": round(sk["cpu_seconds"] / torch_cpu, 2) if m == len(cs) else None,
                "speedup_on_completed_cs": round(sk["seconds"] / max(torch_prefix, 1e-9), 2),
                "val_accuracy_gap_pt": round(100 * (torch_best_prefix - sk["val_accuracy"]), 3),
            }
        )
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
