"""Datasets: one compact on-disk format (uint8 images, int64 labels, manifest) and the presets that build it.

Heavy dependencies (scikit-learn, matplotlib, PIL) are imported only inside the builders that need them.
"""

from .checks import check_labels_fit
from .format import (
    FORMAT_VERSION,
    DatasetBundle,
    DatasetFormatError,
    ImageSet,
    bundle_digest,
    load_bundle,
    read_manifest,
    save_bundle,
    validate_set_name,
)
from .loader import iterate_batches, num_batches
from .presets import PRESETS, available_presets, load_preset

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "DatasetBundle",
    "DatasetFormatError",
    "ImageSet",
    "available_presets",
    "bundle_digest",
    "check_labels_fit",
    "iterate_batches",
    "load_bundle",
    "load_preset",
    "num_batches",
    "read_manifest",
    "save_bundle",
    "validate_set_name",
]
