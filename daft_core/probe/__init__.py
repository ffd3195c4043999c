"""Linear probing: penultimate features once, then a warm-started L2 logistic-regression sweep over C.

``features`` extracts, ``prepare`` validates and standardises, ``lbfgs`` solves one C, ``fit`` sweeps
the grid and folds the chosen head back onto raw features.
"""

from daft_core.probe.features import extract_features
from daft_core.probe.fit import LOGSPACE_CS, ProbeResult, ProbeSolver, fit_linear_probe

__all__ = ["LOGSPACE_CS", "ProbeResult", "ProbeSolver", "extract_features", "fit_linear_probe"]
