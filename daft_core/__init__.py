"""DAFT core: BN conversion, linear probing, one fine-tuning loop, ID/OOD evaluation, models and data.

A pure library: torch, torchvision, timm and numpy only. It never imports MLflow, Kubeflow or DVC, so it
can be used (and tested) on its own.
"""

from daft_core.augment import AugmentConfig, augment_batch, to_float_resized
from daft_core.bn_conversion import BNConversionError, BNConversionReport, batchnorm_layers, convert_batchnorm
from daft_core.data import (
    DatasetBundle,
    DatasetFormatError,
    ImageSet,
    available_presets,
    bundle_digest,
    iterate_batches,
    load_bundle,
    load_preset,
    save_bundle,
)
from daft_core.evaluate import evaluate, expected_calibration_error, parameter_distance
from daft_core.finetune import (
    CheckpointMismatchError,
    FinetuneConfig,
    FinetuneResult,
    NonFiniteLossError,
    finetune,
)
from daft_core.models import (
    MODEL_REGISTRY,
    CheckpointError,
    DaftModel,
    build_model,
    load_model,
    load_state_dict_file,
    save_model,
)
from daft_core.probe import LOGSPACE_CS, ProbeResult, extract_features, fit_linear_probe
from daft_core.recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "LOGSPACE_CS",
    "MODEL_REGISTRY",
    "RECIPES",
    "AugmentConfig",
    "BNConversionError",
    "BNConversionReport",
    "CheckpointError",
    "CheckpointMismatchError",
    "DaftModel",
    "DatasetBundle",
    "DatasetFormatError",
    "FinetuneConfig",
    "FinetuneResult",
    "ImageSet",
    "NonFiniteLossError",
    "ProbeResult",
    "Recipe",
    "augment_batch",
    "available_presets",
    "batchnorm_layers",
    "build_model",
    "bundle_digest",
    "convert_batchnorm",
    "evaluate",
    "expected_calibration_error",
    "extract_features",
    "finetune",
    "fit_linear_probe",
    "get_recipe",
    "iterate_batches",
    "load_bundle",
    "load_model",
    "load_preset",
    "load_state_dict_file",
    "parameter_distance",
    "save_bundle",
    "save_model",
    "to_float_resized",
]
