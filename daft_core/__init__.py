"""DAFT core: BN conversion, linear probing, one fine-tuning loop, ID/OOD evaluation, models and data.

A pure library: torch, torchvision, timm and numpy only. It never imports MLflow, Kubeflow or DVC, so it
can be used (and tested) on its own.

The names below load their module on first use (PEP 562): importing one submodule (say
``daft_core.methods``) does not import the rest, which keeps each pipeline step's start-up and its
dependency set (dvc.yaml) to what it really uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "daft_core.augment": ("AugmentConfig", "augment_batch", "to_float_resized"),
    "daft_core.bn_conversion": (
        "BNConversionError",
        "BNConversionReport",
        "batchnorm_layers",
        "convert_batchnorm",
    ),
    "daft_core.data": (
        "DatasetBundle",
        "DatasetFormatError",
        "ImageSet",
        "available_presets",
        "bundle_digest",
        "iterate_batches",
        "load_bundle",
        "load_preset",
        "save_bundle",
    ),
    "daft_core.evaluate": ("evaluate", "expected_calibration_error", "parameter_distance"),
    "daft_core.training": (
        "CheckpointMismatchError",
        "FinetuneConfig",
        "FinetuneResult",
        "NonFiniteLossError",
        "finetune",
    ),
    "daft_core.methods": ("METHODS", "MIN_HEAD_RATIO", "RECIPES", "Method", "get_method", "get_recipe"),
    "daft_core.models": (
        "MODEL_REGISTRY",
        "CheckpointError",
        "DaftModel",
        "build_model",
        "load_model",
        "load_state_dict_file",
        "save_model",
    ),
    "daft_core.probe": (
        "LOGSPACE_CS",
        "NORMALIZE_MODES",
        "ProbeResult",
        "ProbeSolver",
        "extract_features",
        "fit_linear_probe",
    ),
    "daft_core.recipes": ("Recipe",),
    "daft_core.selection": ("select_best",),
    "daft_core.wise_ft": ("DEFAULT_ALPHAS", "WiseResult", "interpolate", "select_alpha", "start_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'daft_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from daft_core.augment import AugmentConfig, augment_batch, to_float_resized  # noqa: F401
    from daft_core.bn_conversion import (  # noqa: F401
        BNConversionError,
        BNConversionReport,
        batchnorm_layers,
        convert_batchnorm,
    )
    from daft_core.methods import METHODS, RECIPES, get_recipe  # noqa: F401
    from daft_core.models import DaftModel, build_model, load_model, save_model  # noqa: F401
    from daft_core.training import FinetuneConfig, finetune  # noqa: F401
    from daft_core.wise_ft import interpolate, select_alpha  # noqa: F401
