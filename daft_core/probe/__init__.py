"""Linear probing: penultimate features once, then a warm-started L2 logistic-regression sweep over C.

``features`` extracts, ``prepare`` validates and normalises (``normalize="scalar"``, the paper's one
mean / one std, by default), ``lbfgs`` solves one C, ``fit`` sweeps the grid and folds the chosen head
back onto raw features.
"""

from daft_core.probe.features import extract_features
from daft_core.probe.fit import LOGSPACE_CS, ProbeResult, ProbeSolver, fit_linear_probe
from daft_core.probe.prepare import NORMALIZE_MODES, Normalize

__all__ = [
    "LOGSPACE_CS",
    "NORMALIZE_MODES",
    "Normalize",
    "ProbeResult",
    "ProbeSolver",
    "extract_features",
    "fit_linear_probe",
]
