"""Logging a model without the two checks MLflow runs on the way that cost more than the logging itself.

``mlflow.pytorch.log_model`` with explicit requirements and an input example still spends ~2 s of CPU per
model (measured on efficientnet_lite0, benchmarks/repro_breakdown.md) before it writes a byte:

* **Serving-input validation**: it unpickles the model it just saved and predicts the input example, to
  *warn* (never fail) when that does not work. On CPU the first forward pass on a new input shape costs
  ~1.5 s of kernel set-up. The same round trip, in a process with only the model's requirements, is what
  tests/components/test_servable.py checks; the input example is still saved with the model.
* **Requirement check**: to warn when the installed versions do not satisfy the requirements it maps
  every importable module to its distribution by reading every installed package's file list
  (``packages_distributions()``, ~0.6 s). The requirements here are pinned to the installed versions
  (:func:`~components.tracking.tracker.model_requirements`), and MLflow still checks each one: only the
  module map is limited to their packages, for the duration of the call.

Both are private MLflow names (mlflow is pinned in constraints.txt); when one is missing (another MLflow)
the call runs unchanged, only slower, and tests/components/test_tracking_fast_logging.py says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

# (module, attribute) of what lean_log_model replaces while a model is logged
VALIDATION = ("mlflow.models.utils", "_validate_serving_input")
MODULE_MAP = ("mlflow.utils.requirements_utils", "_MODULES_TO_PACKAGES")


def _skip_validation(*_args: Any, **_kwargs: Any) -> None:
    return None


def _package(requirement: str) -> str:
    """``torch==2.5.1`` -> ``torch`` (the distribution name, as MLflow's map spells it)."""
    return re.split(r"[\s<>=!~;\[@]", requirement.strip(), maxsplit=1)[0]


@contextmanager
def lean_log_model(requirements: Sequence[str]) -> Iterator[None]:
    """Inside, MLflow's model logging skips the serving-input validation and checks `requirements`
    against a module map of their own packages only (see the module docstring); both restored after."""
    import importlib

    saved: list[tuple[Any, str, Any]] = []
    try:
        utils = importlib.import_module(VALIDATION[0])
        if hasattr(utils, VALIDATION[1]):
            saved.append((utils, VALIDATION[1], getattr(utils, VALIDATION[1])))
            setattr(utils, VALIDATION[1], _skip_validation)
        reqs = importlib.import_module(MODULE_MAP[0])
        if hasattr(reqs, MODULE_MAP[1]) and getattr(reqs, MODULE_MAP[1]) is None:
            # None = not built yet; an already built (full) map is left alone. Module name = package
            # name for every package a logged model needs (torch, torchvision, timm, numpy, cloudpickle).
            packages = [p for p in map(_package, requirements) if p]
            saved.append((reqs, MODULE_MAP[1], None))
            setattr(reqs, MODULE_MAP[1], {p.replace("-", "_"): [p] for p in packages})
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)
