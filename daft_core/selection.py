"""Model selection: the one rule for "best", used by the report, the Kubeflow sweep and the benchmark.

Best by ID *val* accuracy only (the ID test set is never used for selection); ties go to the earlier
candidate; a candidate without a score (a diverged run) never wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
SELECTION_KEY = "id_val_accuracy"


def best_index(candidates: Sequence[T], score: Callable[[T], float | None]) -> int:
    """Index of the highest score (first on ties); ValueError when no candidate has a score."""
    best, best_score = -1, -math.inf
    for i, c in enumerate(candidates):
        s = score(c)
        if s is not None and math.isfinite(s) and s > best_score:
            best, best_score = i, s
    if best < 0:
        raise ValueError("no candidate has a score to select by (every run diverged or none was given)")
    return best


def select_best(rows: Sequence[dict[str, Any]], key: str = SELECTION_KEY) -> dict[str, Any]:
    """The row with the best ``key`` (ID val accuracy by default)."""
    return rows[best_index(rows, lambda r: r.get(key))]
