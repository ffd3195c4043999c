"""The probe's solver: L2 multinomial logistic regression by a full-batch L-BFGS written in torch.

It minimises exactly scikit-learn's ``LogisticRegression(C=C)`` objective in the scaled form sklearn
uses, ``mean_i CE(x_i W^T + b, y_i) + lam/2 ||W||^2`` with ``lam = 1 / (C N)`` (bias not penalised).
Why our own L-BFGS instead of ``torch.optim.LBFGS`` or scipy: the C grid is swept in increasing order
with warm starts, and because consecutive objectives differ only by the quadratic penalty, the curvature
pairs stay *exact* after a C change once corrected (``LBFGS.shift_lambda``). Keeping that memory across
Cs, a Kronecker-factored initial inverse Hessian (``KronPreconditioner``), caching the data term between
Cs and BLAS matmuls together make the 50-value sweep more than an order of magnitude faster than
sklearn's warm-started sweep (``python -m benchmarks.lp_vs_sklearn``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["FTOL_EPS", "LBFGS", "KronPreconditioner", "Objective", "ftol_for"]

# Stop a C once the loss decrease is within a few float eps of the loss (sklearn/scipy use 64 eps in
# float64, which never binds; in float32 64 eps stops small-C fits early, 8 eps does not).
FTOL_EPS = 8.0


def ftol_for(dtype: torch.dtype) -> float:
    """Relative stall tolerance for ``dtype``: float32 working precision, about sklearn's in float64."""
    return FTOL_EPS * float(torch.finfo(dtype).eps)


class Objective:
    """Mean cross-entropy + lam/2 ||W||^2 on ``[X, 1]``; parameters ``theta = [W | b]`` of shape (K, D+1).

    Gradients are written by hand (two matmuls, no autograd) because this is the whole cost of the sweep.
    The data term of the last evaluation is cached: a change of ``lam`` (next C) or the train accuracy
    of the solution then costs no pass over X, which saves ~2 of the ~5-10 passes an average C needs.
    """

    def __init__(self, x_aug: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
        self.x = x_aug
        self.y = y
        self.n = x_aug.shape[0]
        self.rows = torch.arange(self.n, device=x_aug.device)
        self.k = num_classes
        self.lam = 0.0
        self.evals = 0
        self._theta: torch.Tensor | None = None
        self._ce = 0.0
        self._g_ce: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # logits of the last evaluated theta

    def __call__(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        if theta is not self._theta:
            self.evals += 1
            logits = self.x @ theta.T
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            self._ce = float((lse.squeeze(1) - logits[self.rows, self.y]).mean())
            p = torch.exp(logits - lse)
            p[self.rows, self.y] -= 1.0
            self._g_ce = (p.T @ self.x).div_(self.n)
            self._theta, self.logits = theta, logits
        assert self._g_ce is not None
        w = theta[:, :-1]
        g = self._g_ce.clone()
        g[:, :-1].add_(w, alpha=self.lam)
        return self._ce + 0.5 * self.lam * float((w * w).sum()), g


class KronPreconditioner:
    """Initial inverse Hessian for L-BFGS: a Kronecker-factored Gauss-Newton model of the objective.

    The CE Hessian in W is ``mean_i (diag(p_i) - p_i p_i^T) (x) x_i x_i^T``; replacing it by
    ``A (x) S`` (``A`` = mean softmax curvature, ``S`` = feature second moment) and adding ``lam I`` gives
    a matrix that one eigendecomposition of ``S`` (once per sweep) and of the K x K ``A`` (once per C)
    invert exactly. It removes most of the ill-conditioning of correlated backbone features, so each C
    needs a handful of iterations instead of tens.
    """

    def __init__(self, x_aug: torch.Tensor) -> None:
        d = x_aug.shape[1] - 1
        xw = x_aug[:, :d]
        cov = (xw.T @ xw).double() / x_aug.shape[0]
        e, v = torch.linalg.eigh(cov)
        self.e = e.clamp_min(0).to(x_aug.dtype)
        self.v = v.to(x_aug.dtype)
        self.lam = 0.0
        self.u: torch.Tensor | None = None
        self.a: torch.Tensor | None = None

    def update(self, logits: torch.Tensor, lam: float) -> None:
        """Refresh the softmax factor ``A`` from the current logits (start of each C)."""
        p = torch.softmax(logits.double(), dim=1)
        a_mat = torch.diag(p.mean(0)) - (p.T @ p) / p.shape[0]
        a, u = torch.linalg.eigh(a_mat)
        self.a = a.clamp_min(0).to(logits.dtype)
        self.u = u.to(logits.dtype)
        self.lam = lam

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        assert self.u is not None and self.a is not None
        u, a = self.u, self.a
        floor = 1e-3 * float(a.max())
        out = torch.empty_like(g)
        t = u.T @ g[:, :-1] @ self.v
        t /= (a[:, None] * self.e[None, :] + self.lam).clamp_min(1e-12)
        out[:, :-1] = u @ t @ self.v.T
        out[:, -1] = u @ ((u.T @ g[:, -1]) / a.clamp_min(floor))  # bias: E[1 * 1] = 1, not penalised
        return out


class LBFGS:
    """Minimal full-batch L-BFGS with Armijo backtracking, whose memory survives a change of ``lam``."""

    def __init__(self, history: int = 30, precond: KronPreconditioner | None = None) -> None:
        self.history = history
        self.precond = precond
        self.s: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.rho: list[float] = []

    def shift_lambda(self, delta: float) -> None:
        """The objective gained ``delta/2 ||W||^2``: the curvature pairs gain ``delta * s`` exactly."""
        keep_s, keep_y, keep_rho = [], [], []
        for s, y in zip(self.s, self.y, strict=True):
            y = y.clone()
            y[:, :-1].add_(s[:, :-1], alpha=delta)
            sy = float((s * y).sum())
            if sy > 1e-10 * float((y * y).sum()):
                keep_s.append(s)
                keep_y.append(y)
                keep_rho.append(1.0 / sy)
        self.s, self.y, self.rho = keep_s, keep_y, keep_rho

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        q = g.neg()
        alphas = []
        for s, y, rho in zip(reversed(self.s), reversed(self.y), reversed(self.rho), strict=True):
            a = rho * float((s * q).sum())
            alphas.append(a)
            q.add_(y, alpha=-a)
        if self.precond is not None:
            q = self.precond(q)
        elif self.s:
            s, y = self.s[-1], self.y[-1]
            q.mul_(float((s * y).sum()) / float((y * y).sum()))
        for s, y, rho, a in zip(self.s, self.y, self.rho, reversed(alphas), strict=True):
            b = rho * float((y * q).sum())
            q.add_(s, alpha=a - b)
        return q

    def _remember(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Keep a curvature pair only when it is safely positive, so the inverse Hessian stays SPD."""
        sy = float((s * y).sum())
        if sy > 1e-10 * float((y * y).sum()):
            self.s.append(s)
            self.y.append(y)
            self.rho.append(1.0 / sy)
            if len(self.s) > self.history:
                del self.s[0], self.y[0], self.rho[0]

    def minimize(
        self, fun: Objective, theta: torch.Tensor, max_iter: int, tol: float, ftol: float
    ) -> tuple[torch.Tensor, int]:
        """Iterate until max|grad| <= tol (scipy/sklearn's gtol), a stalled decrease, or max_iter."""
        f, g = fun(theta)
        it = 0
        while it < max_iter:
            if float(g.abs().max()) <= tol:
                break
            d = self._direction(g)
            gtd = float((g * d).sum())
            if gtd >= 0:  # not a descent direction (stale memory): restart from steepest descent
                self.s, self.y, self.rho = [], [], []
                d = g.neg()
                gtd = float((g * d).sum())
            t = 1.0 if self.s or self.precond else min(1.0, 1.0 / max(float(g.abs().sum()), 1e-12))
            for _ in range(30):
                theta_new = theta + t * d
                f_new, g_new = fun(theta_new)
                if math.isfinite(f_new) and f_new <= f + 1e-4 * t * gtd:
                    break
                # quadratic interpolation of the step, kept within [0.1 t, 0.5 t]
                denom = 2.0 * (f_new - f - gtd * t) if math.isfinite(f_new) else 0.0
                t_q = -gtd * t * t / denom if denom > 0 else 0.5 * t
                t = min(max(t_q, 0.1 * t), 0.5 * t)
            else:
                break  # no decrease found: converged to working precision
            it += 1
            self._remember(theta_new - theta, g_new - g)
            stalled = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
            theta, f, g = theta_new, f_new, g_new
            if stalled:
                break
        return theta, it
