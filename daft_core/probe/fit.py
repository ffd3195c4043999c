"""The C sweep: solve the regularisation path in increasing C and keep the best ID-val head.

The head is returned with the train normalisation folded in (``W' = W / std``, ``b' = b - W' @ mean``;
for the paper's scalar mode ``b' = b - W @ (mean / std * 1)``), so it applies to raw features and drops
straight into ``DaftModel.head``.

Selection is reproducible across processes and thread counts: the solve runs in float64 by default (in
float32, BLAS reductions whose order depends on the thread count move the warm-started path enough to
flip single val predictions, and on a flat val-accuracy plateau that moved the chosen C from 0.18 to 12
between a 1- and a 2-thread run on the digits preset), val accuracy is compared as an integer count of
correct samples, and ties keep the first, i.e. smallest, C (the official code's strict ``>``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from daft_core.devices import resolve_device
from daft_core.probe.features import maybe_tqdm
from daft_core.probe.lbfgs import LBFGS, KronPreconditioner, Objective, ftol_for
from daft_core.probe.prepare import (
    NormalisedProblem,
    Normalize,
    check_normalize,
    normalise,
    sorted_cs,
    validate_inputs,
)

__all__ = ["LOGSPACE_CS", "ProbeResult", "ProbeSolver", "fit_linear_probe", "fold_head"]

logger = logging.getLogger(__name__)

#: The paper's C grid (Ha et al. 2024, following Kumar et al. 2022): 50 values from 1e-7 to 1e2.
LOGSPACE_CS: np.ndarray = np.logspace(-7, 2, 50)

ArrayLike = torch.Tensor | np.ndarray


_INT_KEYS = ("iterations", "evaluations", "val_correct")


@dataclass
class ProbeResult:
    """The selected head (on raw features) and the whole sweep, for logging and reports."""

    head: nn.Linear
    best_C: float
    val_accuracy: float
    train_accuracy: float
    sweep: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    num_classes: int = 0
    num_features: int = 0
    normalize: str = "scalar"
    solver: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary without the head's weights."""
        d = asdict(self)  # deep-copies the Linear too; cheap for a head, keeps the code obvious
        d.pop("head")
        d["sweep"] = [{k: (int(v) if k in _INT_KEYS else float(v)) for k, v in r.items()} for r in self.sweep]
        return d


@dataclass(frozen=True)
class ProbeSolver:
    """Solver knobs: the defaults are the official DAFT probe's, so most callers never build one.

    ``max_iter`` caps L-BFGS iterations per C, with sklearn's meaning: sklearn's lbfgs passes it to
    scipy's L-BFGS-B as ``maxiter`` and reports scipy's ``nit`` (accepted steps, each with its line
    search) as ``n_iter_``; ours counts accepted steps the same way, fresh at every C, as sklearn's
    ``warm_start=True`` refit per C does. 200 is the official config's ``transfer.max_iter``
    (``LogisticRegression(max_iter=200, warm_start=True)``; sklearn's own default is 100). ``tol`` is
    sklearn's default 1e-4 on the max-abs gradient of the same mean-loss objective (scipy's ``gtol``).
    Our steps are preconditioned and keep their curvature memory across Cs, so a C needs fewer of them
    (77 vs sklearn's 303 over 20 Cs in ``benchmarks.lp_vs_sklearn --n 1000 --dim 256 --num-cs 20``);
    the cap binds later for us, and both stop at the same gradient tolerance.
    ``history`` is the L-BFGS memory; ``precondition`` toggles the Kronecker preconditioner (speed only).
    ``dtype`` defaults to float64, which makes the chosen C independent of the BLAS thread count (see the
    module docstring); float32 is faster on large problems, and an extra stop rule then ends a C once
    the loss decrease reaches working precision (scipy's ftol rule at 8 eps).
    """

    max_iter: int = 200
    tol: float = 1e-4
    history: int = 30
    precondition: bool = True
    dtype: torch.dtype = torch.float64

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.tol <= 0:
            raise ValueError(
                f"max_iter must be >= 1 and tol > 0, got max_iter={self.max_iter}, tol={self.tol}"
            )
        if self.history < 0:
            raise ValueError(f"history must be >= 0, got {self.history}")
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {self.dtype}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able knobs, for the result's record."""
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "history": self.history,
            "precondition": self.precondition,
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def _with_overrides(solver: ProbeSolver | None, max_iter: int | None, tol: float | None) -> ProbeSolver:
    """``max_iter=``/``tol=`` stay plain keywords (sklearn users reach for them); they win over ``solver``."""
    base = ProbeSolver() if solver is None else solver
    overrides: dict[str, Any] = {}
    if max_iter is not None:
        overrides["max_iter"] = max_iter
    if tol is not None:
        overrides["tol"] = tol
    return replace(base, **overrides) if overrides else base


@dataclass
class _Best:
    val_correct: int
    val_accuracy: float
    C: float
    train_accuracy: float
    theta: torch.Tensor


class _WarmPath:
    """The path in increasing C: each C starts from the last optimum *and* keeps the L-BFGS memory.

    Consecutive objectives differ only in the penalty, so the previous optimum is close and the curvature
    pairs stay exact once shifted; this is where most of the sweep's speed comes from.
    """

    def __init__(self, prob: NormalisedProblem, num_classes: int, solver: ProbeSolver) -> None:
        self.prob = prob
        self.solver = solver
        self.fun = Objective(prob.x_train, prob.y_train, num_classes)
        precond = KronPreconditioner(prob.x_train) if solver.precondition else None
        self.lbfgs = LBFGS(history=solver.history, precond=precond)
        self.ftol = ftol_for(solver.dtype)
        self.theta = torch.zeros(
            num_classes, prob.x_train.shape[1], device=prob.device, dtype=prob.x_train.dtype
        )
        self.started = False

    def solve(self, c: float) -> tuple[int, int]:
        """Move to ``C = c``; return (L-BFGS iterations, passes over X)."""
        fun, lbfgs = self.fun, self.lbfgs
        lam = 1.0 / (c * fun.n)
        if self.started:
            lbfgs.shift_lambda(lam - fun.lam)
        self.started = True
        fun.lam = lam
        evals0 = fun.evals
        if lbfgs.precond is not None:
            fun(self.theta)  # cached after the first C
            assert fun.logits is not None
            lbfgs.precond.update(fun.logits, lam)
        self.theta, iters = lbfgs.minimize(
            fun, self.theta, max_iter=self.solver.max_iter, tol=self.solver.tol, ftol=self.ftol
        )
        return iters, fun.evals - evals0

    @torch.no_grad()
    def score(self) -> tuple[float, int, float]:
        """(train accuracy, val correct count, val loss) of the current optimum; train costs no pass."""
        self.fun(self.theta)  # cached: the solver's last evaluation was at theta
        assert self.fun.logits is not None
        y_train, y_val = self.prob.y_train, self.prob.y_val
        train_acc = float(self.fun.logits.argmax(1).eq(y_train).double().mean())
        val_logits = self.prob.x_val @ self.theta.T
        val_correct = int(val_logits.argmax(1).eq(y_val).sum())
        val_loss = float(nn.functional.cross_entropy(val_logits.double(), y_val))
        return train_acc, val_correct, val_loss


def _sweep(
    path: _WarmPath, cs: np.ndarray, patience: int | None, progress: bool
) -> tuple[list[dict[str, float]], _Best]:
    """Solve every C (or until ``patience``); ties keep the smaller C, the safer choice under shift.

    Compared as integer counts of correct val samples, so "a tie" is exact, not a float comparison.
    """
    best: _Best | None = None
    sweep: list[dict[str, float]] = []
    since_best = 0
    bar = maybe_tqdm(len(cs), "probe C sweep") if progress else None
    for c in cs:
        tc = time.perf_counter()
        iters, evals = path.solve(float(c))
        train_acc, val_correct, val_loss = path.score()
        val_acc = val_correct / len(path.prob.y_val)
        sweep.append(
            {
                "C": float(c),
                "train_accuracy": train_acc,
                "val_accuracy": val_acc,
                "val_correct": val_correct,
                "val_loss": val_loss,
                "iterations": iters,
                "evaluations": evals,
                "seconds": time.perf_counter() - tc,
            }
        )
        logger.debug("C=%.3g iters=%d train_acc=%.4f val_acc=%.4f", c, iters, train_acc, val_acc)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(C=f"{c:.2g}", val_acc=f"{val_acc:.4f}")
        if best is None or val_correct > best.val_correct:  # strict: ties keep the smaller C
            best = _Best(val_correct, val_acc, float(c), train_acc, path.theta.clone())
            since_best = 0
        else:
            since_best += 1
            if patience is not None and since_best >= patience:
                logger.info("probe sweep stopped early after %d Cs without improvement", since_best)
                break
    if bar is not None:
        bar.close()
    assert best is not None
    return sweep, best


def fold_head(theta: torch.Tensor, prob: NormalisedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the normalisation into ``theta = [W | b]`` (float64): ``raw @ W'.T + b'`` = the solver's logits.

    ``W' = W / std`` and ``b' = b - W' @ mean`` per live column (weight 0 elsewhere); for the scalar mode
    this is the official ``W / std``, ``b - W @ (mean / std * 1)``. Returns float64 ``(W', b')`` on CPU.
    """
    k = theta.shape[0]
    th = theta.to(torch.float64)
    w_live = th[:, :-1] / prob.std
    b = th[:, -1] - w_live @ prob.mean
    w = torch.zeros(k, prob.num_features, dtype=torch.float64, device=th.device)
    w[:, prob.live] = w_live
    return w.cpu(), b.cpu()


def _to_linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    """A float32 ``nn.Linear`` holding the folded head, ready for ``DaftModel.head``."""
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w.float())
        head.bias.copy_(b.float())
    return head


def fit_linear_probe(
    train_feats: ArrayLike,
    train_y: ArrayLike,
    val_feats: ArrayLike,
    val_y: ArrayLike,
    Cs: Sequence[float] | np.ndarray | None = None,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    patience: int | None = None,
    progress: bool = False,
    normalize: Normalize = "scalar",
    solver: ProbeSolver | None = None,
    max_iter: int | None = None,
    tol: float | None = None,
) -> ProbeResult:
    """Sweep C (default ``LOGSPACE_CS``) for an L2 multinomial logistic probe; keep the best ID-val C.

    Same objective as ``sklearn.linear_model.LogisticRegression(C=C)`` (lbfgs, multinomial) on the
    normalised features, so the paper's grid means what it meant there. ``normalize`` is ``"scalar"``
    (default: the paper's one mean / one std over all train features), ``"per_feature"`` (sklearn's
    StandardScaler) or ``"none"`` (see ``daft_core.probe.prepare``). Ties go to the smaller C.
    ``patience=k`` stops after ``k`` Cs without a new best; the default sweeps the whole grid, as the
    paper does. ``device`` defaults to
    CUDA when available. ``max_iter``/``tol`` override the same fields of ``solver`` (see ProbeSolver).
    Two classes are a 2-way softmax: the same model as sklearn's binary fit at 2C (w splits into ±w/2).
    ``progress`` shows a tqdm bar over the Cs when stderr is a terminal.
    """
    t0 = time.perf_counter()
    check_normalize(normalize)
    xt, yt, xv, yv, k = validate_inputs(train_feats, train_y, val_feats, val_y, num_classes)
    cs = sorted_cs(LOGSPACE_CS if Cs is None else Cs)
    solver = _with_overrides(solver, max_iter, tol)
    dev = resolve_device(device)
    prob = normalise(xt, yt, xv, yv, dev, solver.dtype, normalize)
    sweep, best = _sweep(_WarmPath(prob, k, solver), cs, patience, progress)
    head = _to_linear(*fold_head(best.theta, prob))
    seconds = time.perf_counter() - t0
    logger.info(
        "linear probe (%s normalisation): %d Cs in %.2fs on %s, best C=%.3g val_acc=%.4f (train_acc=%.4f)",
        normalize,
        len(sweep),
        seconds,
        dev,
        best.C,
        best.val_accuracy,
        best.train_accuracy,
    )
    return ProbeResult(
        head=head,
        best_C=best.C,
        val_accuracy=best.val_accuracy,
        train_accuracy=best.train_accuracy,
        sweep=sweep,
        seconds=seconds,
        num_classes=k,
        num_features=prob.num_features,
        normalize=normalize,
        solver=solver.to_dict(),
    )
