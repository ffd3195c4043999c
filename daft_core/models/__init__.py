"""Models for DAFT: a backbone that yields penultimate features plus a replaceable linear head.

Split by job: ``wrapper`` (the :class:`DaftModel` type), ``registry`` (names -> architectures,
:func:`build_model`) and ``checkpoint`` (safe reading, fitting and saving of weights, URI openers).
Callers import from here, so the split stays an internal detail.
"""

from daft_core.models.checkpoint import (
    MOCO_PREFIX,
    CheckpointError,
    CheckpointFormat,
    Fetcher,
    load_model,
    load_state_dict_file,
    register_opener,
    save_model,
    uri_scheme,
)
from daft_core.models.registry import MODEL_REGISTRY, Builder, WeightsArg, build_model, register_model
from daft_core.models.wrapper import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_LITE_MEAN,
    TF_LITE_STD,
    DaftModel,
    count_batchnorm,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOCO_PREFIX",
    "MODEL_REGISTRY",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "Builder",
    "CheckpointError",
    "CheckpointFormat",
    "DaftModel",
    "Fetcher",
    "WeightsArg",
    "build_model",
    "count_batchnorm",
    "load_model",
    "load_state_dict_file",
    "register_model",
    "register_opener",
    "save_model",
    "uri_scheme",
]
